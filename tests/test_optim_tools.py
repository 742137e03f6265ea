"""optuna's own tools read the studies stagetune writes: the ``optuna`` CLI and optuna-dashboard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optim_helpers import create_study, opened_study, wait_for, write_speech_data
from servers import free_port

from stagetune.optim.worker import WorkerOptions, run_worker

BIN = Path(sys.executable).parent


def _study_with_trials(url: str, tmp_path: Path) -> list[optuna.trial.FrozenTrial]:
    """Four trials run by a stagetune worker (quadratic objective)."""
    create_study(url, "optim", write_speech_data(tmp_path / "data"),
                 whitelist=[r"training\.(learning_rate|optimizer|momentum)"], num_trials=4)
    run_worker(url, "optim", WorkerOptions(objective="quadratic", sampler="random", seed=1),
               log=lambda _message: None)
    with opened_study(url, "optim") as study:
        return study.get_trials()


def _optuna(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([str(BIN / "optuna"), *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_optuna_cli_reads_stagetune_studies(storage_url: str, tmp_path: Path) -> None:
    trials = _study_with_trials(storage_url, tmp_path)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    where = ["--study-name", "optim", "--storage", storage_url]
    listing = _optuna(["trials", *where, "-f", "yaml"], tmp_path)
    best = _optuna(["best-trial", *where, "-f", "json"], tmp_path)
    listed, listing_err = listing.communicate(timeout=120)
    best_out, best_err = best.communicate(timeout=120)
    assert listing.returncode == 0, listing_err
    assert best.returncode == 0, best_err

    rows = yaml.safe_load(listed)
    assert [(r["number"], r["state"], r["value"]) for r in rows] == [
        (t.number, "COMPLETE", t.value) for t in trials
    ]
    assert [r["params"] for r in rows] == [t.params for t in trials]
    expected = min(trials, key=lambda t: t.value)
    shown = json.loads(best_out)
    assert (shown["number"], shown["value"], shown["params"]) == (
        expected.number, expected.value, expected.params
    )


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.slow
def test_optuna_dashboard_lists_stagetune_studies(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    trials = _study_with_trials(url, tmp_path)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(BIN / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        api = f"http://127.0.0.1:{port}/api/studies"
        summaries = wait_for("optuna-dashboard to answer", lambda: _get_json(api), timeout=60,
                             interval=0.5)["study_summaries"]
        (summary,) = [s for s in summaries if s["study_name"] == "optim"]
        attrs = {a["key"]: a["value"] for a in summary["user_attrs"]}
        # The short attributes are listed; the full spec is not (a system attribute, where workers read it).
        assert "stagetune_spec" not in attrs and {"data", "tuned", "budget", "metric"} <= set(attrs)
        detail = _get_json(f"{api}/{summary['study_id']}?after=0")
        assert [(t["number"], t["state"], t["values"]) for t in detail["trials"]] == [
            (t.number, "Complete", [t.value]) for t in trials
        ]
        best = min(trials, key=lambda t: t.value)
        assert [t["number"] for t in detail["best_trials"]] == [best.number]
    finally:
        # A SIGTERMed dashboard has been seen to stay alive: wait, then SIGKILL.
        os.killpg(dashboard.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while dashboard.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if dashboard.poll() is None:
            os.killpg(dashboard.pid, signal.SIGKILL)
        dashboard.wait(timeout=30)
