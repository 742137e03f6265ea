"""``bench/search_quality.py`` at its smoke scale keeps working (issue 11).

The full bench takes hours and never runs here; this runs one strategy of each
kind once (the default config, a flat study with a pruner, a staged plan with
its narrowing options, the default config queued first and its ranges cut around
it; 1 seed, a few seconds of trial compute each) through the
real CLI on a small synthetic Kaldi corpus, then checks what a user reads: the
table, the curves, ``results.json``, and that a rerun resumes (finished runs
are not run again).  The other strategies differ from these only in the
sampler or the plan options they pass.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import TINY_TOKENS, random_feats, write_data_dir
from optim_helpers import read_spec

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("default", "tpe-hyperband", "staged-local")

pytestmark = pytest.mark.slow


def _corpus(root: Path) -> dict[str, Path]:
    dirs = {}
    for k, (name, n) in enumerate((("train", 24), ("dev", 12), ("test", 12))):
        feats, utt2spk = random_feats(n, feat_dim=8, min_frames=20, max_frames=40, seed=10 + k)
        rng = np.random.default_rng(20 + k)
        text = {u: [TINY_TOKENS[j] for j in rng.integers(0, 5, size=rng.integers(1, 4))] for u in feats}
        dirs[name] = write_data_dir(root / name, feats, text, tokens=TINY_TOKENS, utt2spk=utt2spk, cmvn=True)
    return dirs


def _bench(out: Path, data: dict[str, Path], *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(REPO / "bench" / "search_quality.py"), "--scale", "smoke", "--seeds", "1",
            "--budget", "3", "--out", str(out), "--strategies", *STRATEGIES, *(f"--{k}={v}" for k, v in data.items()),
            *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(argv, cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)


def test_every_strategy_runs_reports_and_a_rerun_resumes(tmp_path: Path) -> None:
    data = _corpus(tmp_path / "corpus")
    out = tmp_path / "sq"
    done = _bench(out, data)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[2:]] == list(STRATEGIES)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    for strategy in STRATEGIES:
        (run,) = results["runs"][strategy]
        assert 0.0 <= run["test_error"] and 0.0 <= run["dev_error"]
        assert (out / strategy / "seed-0" / "final" / "model.pt").is_file()
        if strategy == "default":
            assert run["trials"] == 0
            continue
        # the budget was spent on finished trials, each counted once on the curve
        assert run["trials"] >= 2 and run["compute_s"] >= 3.0, run
        assert len(run["curve"]["seconds"]) == run["trials"]
        assert run["curve"]["seconds"] == sorted(run["curve"]["seconds"])
    # the staged run searched in two studies: sm (random near the default config, which runs first),
    # then lg (TPE, narrowed further)
    run_dir = out / "staged-local" / "seed-0"
    plan = (run_dir / "plan.ini").read_text()
    sm, lg = plan.split("[lg]")
    assert "enqueue_base = true" in sm and "around_base = 0.25" in sm
    assert "from = sm" in lg and "narrow = 0.25" in lg
    with sqlite3.connect(run_dir / "optim.db") as db:
        per_study = dict(db.execute(
            "SELECT s.study_name, COUNT(*) FROM trials t JOIN studies s USING (study_id) GROUP BY s.study_name"))
    assert per_study.get("sq-sm", 0) >= 2 and per_study.get("sq-lg", 0) >= 1, per_study
    sm_spec = read_spec(f"sqlite:///{run_dir / 'optim.db'}", "sq-sm")
    assert sm_spec["narrowed_from"] == {"around_base": 0.25} and "training.learning_rate" in sm_spec["ranges"]

    # a report of a bench in progress runs nothing: here two more seeds are asked for, none finished
    report = _bench(out, data, "--report", "--seeds", "3")
    assert report.returncode == 0, report.stderr[-3000:]
    assert "== " not in report.stdout and not (out / "default" / "seed-1").exists()
    assert [line for line in report.stdout.splitlines() if line.startswith("| ")] == table

    again = _bench(out, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "== " not in again.stdout  # nothing run again: every run was finished
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
