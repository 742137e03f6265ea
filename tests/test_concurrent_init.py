"""Concurrent ``stagetune optim init`` of one study: one creates it, the others see it.

Workers in a cluster job script often all run ``optim init`` before ``optim run``.
Released together, they must behave as if they had run one after another: one
creates the study with its spec, the others answer as a rerun would.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import alembic.command  # noqa: F401  (imported once, before the processes fork)
import alembic.migration  # noqa: F401
import pytest
from fixtures_db import BACKENDS
from optim_helpers import (
    assert_one_line_error,
    create_study,
    read_spec,
    study_names,
    trial_states,
    write_speech_data,
)

from stagetune.optim.storage import close_storage, driver_modules, open_storage, storage_session

#: Forks processes that run ``stagetune`` commands (the console script's entry point,
#: ``stagetune.cli.main``) in rounds, each round released by a gate file at the same
#: moment in every process. The slow imports (torch, the database drivers) happen
#: once, before the fork, so the commands race as closely as they can.
_GATED_CLI = """
import importlib, json, os, sys, time, traceback
work, count, modules, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(","), json.loads(sys.argv[4])
for module in modules:
    importlib.import_module(module)
from stagetune.cli import main

def run_rounds(index):
    for number, commands in enumerate(rounds):
        argv = commands[index]
        name = f"{work}/{number}.{index}"
        open(f"{name}.ready", "w").close()  # (empty: it is complete once it exists)
        while not os.path.exists(f"{work}/{number}.go"):
            time.sleep(0.001)
        saved = [os.dup(1), os.dup(2)]
        for fd, suffix in ((1, "out"), (2, "err")):  # the command's own stdout and stderr
            with open(f"{name}.{suffix}", "w") as handle:
                os.dup2(handle.fileno(), fd)
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(), sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
        with open(f"{name}.code.part", "w") as handle:
            handle.write(str(code))
        os.rename(f"{name}.code.part", f"{name}.code")

children = []
for index in range(count):
    pid = os.fork()
    if pid == 0:
        run_rounds(index)
        os._exit(0)
    children.append(pid)
sys.exit(int(any(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children)))
"""
_PRELOAD = [
    "stagetune.cli.optim", "stagetune.optim.study", "stagetune.corpus", "optuna.storages._rdb.storage",
    "alembic.command", "alembic.migration", "alembic.script",
]


def _released_together(
    rounds: list[list[list[str]]], work: Path, modules: list[str]
) -> list[list[subprocess.CompletedProcess[str]]]:
    """Run rounds of commands, one command per process in each, every round started in all at once.

    Returns:
        Per round, what each process's command did (exit status, stdout, stderr).
    """
    num_processes = len(rounds[0])
    proc = subprocess.Popen(
        [sys.executable, "-c", _GATED_CLI, str(work), str(num_processes), ",".join(modules), json.dumps(rounds)],
        start_new_session=True,
    )
    try:
        done = []
        for number, commands in enumerate(rounds):
            names = [f"{work}/{number}.{index}" for index in range(num_processes)]
            _wait_for_files([Path(f"{n}.ready") for n in names], proc)
            (work / f"{number}.go").touch()
            _wait_for_files([Path(f"{n}.code") for n in names], proc)
            done.append([
                subprocess.CompletedProcess(argv, int(Path(f"{n}.code").read_text()),
                                            Path(f"{n}.out").read_text(), Path(f"{n}.err").read_text())
                for n, argv in zip(names, commands)
            ])
        assert proc.wait(timeout=60) == 0
        return done
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_for_files(paths: list[Path], proc: subprocess.Popen[bytes]) -> None:
    """Wait until every forked process has written its file."""
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in paths):
        assert proc.poll() is None, "the processes ended early"
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.005)


@pytest.mark.server
def test_concurrent_inits_create_one_study_and_the_others_answer_as_a_rerun(
    make_storage_url: Callable[..., str], tmp_path: Path
) -> None:
    data = write_speech_data(tmp_path / "data")
    urls = [make_storage_url(backend) for backend in BACKENDS]
    for url in urls:  # the tables exist: the processes race to create the study itself
        create_study(url, "earlier", data, whitelist=[r"training\.learning_rate"])

    def init(url: str, study_name: str, num_trials: int) -> list[str]:
        return ["optim", "--study-name", study_name, url, "init", str(data), "--num-trials", str(num_trials),
                "--whitelist", r"training\.dropout_prob", "--enqueue-base"]

    # Six identical inits of one study on each backend; then, on a new SQLite file,
    # three and three with different budgets.
    fresh = make_storage_url("sqlite")
    rounds = [[init(url, "race", 4)] * 6 for url in urls]
    rounds.append([init(fresh, "split", 4)] * 3 + [init(fresh, "split", 5)] * 3)
    modules = [*_PRELOAD, *(m for url in urls for m in driver_modules(url))]
    *identical, split = _released_together(rounds, tmp_path, modules)

    for url, done in zip(urls, identical):
        for result in done:
            assert (result.returncode, result.stderr) == (0, ""), (url, result.stderr)
        outputs = sorted(result.stdout.split(" in ")[0] for result in done)
        assert outputs == ["created study race"] + ["study race"] * 5, (url, outputs)
        assert sum("already exists with these settings; nothing to do" in r.stdout for r in done) == 5
        assert sorted(study_names(url)) == ["earlier", "race"]
        spec = read_spec(url, "race")
        assert spec["num_trials"] == 4 and spec["tuned"] == ["training.dropout_prob"]
        assert trial_states(url, "race") == {"WAITING": 1}  # the base trial, queued once

    # Whichever won, the others got what a rerun gets: nothing to do, or the refusal.
    (winner,) = [i for i, result in enumerate(split) if result.stdout.startswith("created study split")]
    won = 4 if winner < 3 else 5
    assert study_names(fresh) == ["split"] and read_spec(fresh, "split")["num_trials"] == won
    for i, result in enumerate(split):
        ours = 4 if i < 3 else 5
        if i == winner:
            assert (result.returncode, result.stderr) == (0, ""), result.stderr
        elif ours == won:
            assert (result.returncode, result.stderr) == (0, ""), result.stderr
            assert "already exists with these settings; nothing to do" in result.stdout
        else:
            assert result.returncode == 2
            assert_one_line_error(result, "exists with other settings", f"num_trials: {won} -> {ours}")


def _open_at(url: str, barrier: Any, results: Any) -> None:
    """A forked process: open the storage (creating the tables) when the others do."""
    try:
        barrier.wait(timeout=60)
        close_storage(open_storage(url))
        results.put("ok")
    except BaseException as exc:  # the parent would otherwise wait in vain
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_database_together_create_its_tables_once(storage_url: str) -> None:
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(6), context.Queue()
    procs = [context.Process(target=_open_at, args=(storage_url, barrier, results)) for _ in range(6)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == ["ok"] * 6
    with storage_session(storage_url, create=False) as storage:
        assert storage.get_all_studies() == []
        with storage.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM alembic_version").scalar() == 1
            assert connection.exec_driver_sql("SELECT COUNT(*) FROM version_info").scalar() == 1
