"""Optuna's own storage tests, run against the storage stagetune opens, on every backend.

The tests are taken at test time from the optuna sdist of the installed version
(``pip download`` through the configured package index, cached under
``.cache/optuna-sdist/``; never copied into this repository) and run with pytest
in two subprocesses side by side (the heartbeat tests mostly sleep), each on all
three backends. ``optuna_storage_plugin.py`` points their storage factory at
:func:`stagetune.optim.storage.open_storage` on SQLite, PostgreSQL and MariaDB,
plain and wrapped in optuna's ``_CachedStorage`` (what ``optuna.load_study``
makes of it).

Every failure is fixed, or listed in :data:`DESELECTED` with its reason: the same
list is in docs/optuna-differences.md (a test keeps the two equal).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import re
import resource
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from fixtures_db import TEST_DB_USER

ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
DOC = ROOT / "docs" / "optuna-differences.md"
#: Where the sdist and its extracted tests are kept (ignored by git); override with
#: STAGETUNE_OPTUNA_SDIST_CACHE.
CACHE = Path(os.environ.get("STAGETUNE_OPTUNA_SDIST_CACHE", ROOT / ".cache" / "optuna-sdist"))

#: optuna's test modules whose storages come from its storage factory (the others,
#: under storages_tests/, build optuna's RDBStorage, journal or gRPC storages
#: directly: they test optuna, not stagetune's storage). Two groups run side by
#: side: the heartbeat tests mostly sleep (waiting for heartbeats to go stale),
#: the others mostly work.
GROUPS = {
    "heartbeat": ("tests/storages_tests/test_heartbeat.py", "tests/storages_tests/test_callbacks.py"),
    "storage": ("tests/storages_tests/test_storages.py", "tests/storages_tests/test_with_server.py"),
}

_HB = "tests/storages_tests/test_heartbeat.py::"
_ST = "tests/storages_tests/test_storages.py::TestStorage::"
_USAGE = ("open_storage refuses a non-positive heartbeat interval or grace period with its "
          "one-line UsageError, not optuna's ValueError")
_SILENT = ("open_storage silences optuna's ExperimentalWarning for heartbeat_interval "
           "(stagetune always sets it; users cannot act on the warning)")
_MARIADB = ("optuna's schema stores trial times as DATETIME without fractional seconds on "
            "MySQL/MariaDB, so they come back truncated; optuna's plain RDBStorage fails the same")

#: Deliberate differences: optuna test id -> why stagetune's storage differs.
DESELECTED: dict[str, str] = {
    **{f"{_HB}test_invalid_heartbeat_interval_and_grace_period[{mode}]": _USAGE
       for mode in ("sqlite", "cached_sqlite", "cached_postgresql", "cached_mysql")},
    **{f"{_HB}test_heartbeat_experimental_warnings[{mode}]": _SILENT
       for mode in ("sqlite", "cached_sqlite", "cached_postgresql", "cached_mysql")},
    **{f"{_ST}{test}[{mode}{suffix}]": _MARIADB
       for test, suffix in (("test_create_new_trial", ""), ("test_get_trial", ""),
                            ("test_get_all_trials", ""),
                            ("test_create_new_trial_with_template_trial", "-start_time0-complete_time0"))
       for mode in ("cached_mysql", "lockconn_mysql")},
}

_SUITE_TIMEOUT_S = 1200


def _sdist_tests(version: str) -> Path:
    """optuna's test tree of ``version``, extracted from its sdist (downloaded once)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("a") as lock:  # test sessions side by side fetch it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch(version)


def _fetch(version: str) -> Path:
    extracted = CACHE / f"optuna-{version}"
    stamp = extracted / ".extracted"
    if stamp.exists():
        return extracted
    sdist = CACHE / f"optuna-{version}.tar.gz"
    if not sdist.exists():
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", f"optuna=={version}", "--no-deps",
             "--no-binary", ":all:", "--disable-pip-version-check", "-q", "-d", str(CACHE)],
            capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0 or not sdist.exists():
            pytest.fail(f"could not download the optuna {version} sdist through the package index "
                        f"(pip exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}",
                        pytrace=False)
    prefix = f"optuna-{version}/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers()
                   if m.name.startswith(prefix + "tests/storages_tests/")
                   or m.name in (prefix + "tests/__init__.py", prefix + "tests/conftest.py")]
        archive.extractall(CACHE, members=members, filter="data")
    # optuna's own pytest settings (its pyproject.toml), as an ini of their own
    (extracted / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings =\n    ignore::optuna.exceptions.ExperimentalWarning\n"
    )
    stamp.touch()
    return extracted


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _backend(nodeid: str) -> str:
    """The backend a test ran on: its mode parameter; unparametrized ones are SQLite."""
    params = re.search(r"\[(.*)\]$", nodeid)
    for part in (params[1].split("-") if params else []):
        name = part.rpartition("_")[2]
        if name in ("sqlite", "postgresql", "mysql"):
            return name
    return "sqlite"


def _results(junit: Path) -> list[tuple[str, str, float]]:
    """(class::name, outcome, seconds) of every test in a junit XML report."""
    results = []
    for case in ElementTree.parse(junit).iter("testcase"):
        outcome = "passed"
        for tag, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            if case.find(tag) is not None:
                outcome = name
                break
        results.append((f"{case.get('classname')}::{case.get('name')}", outcome, float(case.get("time", 0))))
    return results


def test_deliberate_differences_are_documented() -> None:
    text = DOC.read_text()
    documented = set(re.findall(r"^- `([^`]+)`", text, re.M))
    assert documented == set(DESELECTED), (
        f"docs/optuna-differences.md and DESELECTED differ: only in the doc {documented - set(DESELECTED)}, "
        f"only in the test {set(DESELECTED) - documented}"
    )


@pytest.mark.server
def test_optunas_storage_tests_pass_on_stagetunes_storage(
    postgres_server, mariadb_server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    version = importlib.metadata.version("optuna")
    suite = _sdist_tests(version)
    config = {
        "servers": {
            "postgresql": {"base_dir": str(postgres_server.base_dir), "port": postgres_server.port,
                           "user": TEST_DB_USER},
            "mysql": {"base_dir": str(mariadb_server.base_dir), "port": mariadb_server.port,
                      "user": TEST_DB_USER, "option_file": str(mariadb_server.option_file)},
        },
    }
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {
        **os.environ,
        "STAGETUNE_OPTUNA_SUITE": json.dumps(config),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")])),
        "TMPDIR": str(scratch),  # optuna's temporary SQLite files, and ours
    }
    started, cpu_before = time.monotonic(), _children_cpu_s()
    runs = {}
    for group, paths in GROUPS.items():
        log = (tmp_path / f"{group}.log").open("w")
        command = [sys.executable, "-m", "pytest", *paths, "-v", "-p", "optuna_storage_plugin",
                   "-p", "no:cacheprovider", "--rootdir", str(suite), "-c", str(suite / "pytest.ini"),
                   f"--junitxml={tmp_path / f'{group}.xml'}", "-rfE", "--tb=short", "--color=no",
                   "--durations=10",
                   *(arg for nodeid in DESELECTED if nodeid.startswith(paths)
                     for arg in ("--deselect", nodeid))]
        runs[group] = (subprocess.Popen(command, cwd=suite, env=env, stdout=log,
                                        stderr=subprocess.STDOUT), log)
    output = ""
    try:
        for group, (process, log) in runs.items():
            try:
                process.wait(timeout=max(1.0, _SUITE_TIMEOUT_S - (time.monotonic() - started)))
            finally:
                log.close()
    finally:
        for group, (process, _) in runs.items():
            if process.poll() is None:
                process.kill()
                process.wait()
            text = (tmp_path / f"{group}.log").read_text(errors="replace")
            output += f"--- {group} (exit {process.returncode}) ---\n{text[-5000:]}\n"
    elapsed, cpu = time.monotonic() - started, _children_cpu_s() - cpu_before
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: Counter[str] = Counter()
    deselected = 0
    for group in GROUPS:
        junit = tmp_path / f"{group}.xml"
        assert junit.exists(), output
        for nodeid, outcome, duration in _results(junit):
            outcomes[_backend(nodeid)][outcome] += 1
            seconds[_backend(nodeid)] += duration
        found = re.search(r"(\d+) deselected", (tmp_path / f"{group}.log").read_text())
        deselected += int(found[1]) if found else 0
    summary = "; ".join(
        f"{backend}: {dict(outcomes[backend])} in {seconds[backend]:.0f} s"
        for backend in ("sqlite", "postgresql", "mysql")
    )
    with capsys.disabled():
        print(f"\noptuna {version} storage tests on stagetune's storage ({elapsed:.0f} s, "
              f"{cpu:.0f} s CPU of pytest): {summary}")
    assert all(process.returncode == 0 for process, _ in runs.values()), f"{summary}\n{output}"
    assert deselected == len(DESELECTED), f"a DESELECTED id names no test of optuna {version}\n{output}"
    for backend in ("sqlite", "postgresql", "mysql"):
        assert outcomes[backend]["passed"] >= 100, summary
        assert not outcomes[backend]["failed"] and not outcomes[backend]["error"], summary
