"""``optim run --workers N`` (stagetune.optim.pool): N real worker processes on one study.

The pool forks its workers after importing once (Linux) or starts fresh
interpreters; either way each worker is its own process, its lines carry a
``[wI]`` prefix, ``--gpus`` pins one GPU per worker through
CUDA_VISIBLE_DEVICES, and the pool ends with one combined summary. SIGTERM to
the pool is covered in test_optim_preemption.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from optim_helpers import assert_one_line_error, budget_spec_args, cli, create_study, trial_states

from stagetune.cli import main
from stagetune.optim.pool import run_pool

SLEEP = ["--objective", "sleep", "--sleep-seconds", "0.05", "--sampler", "random"]
_START = re.compile(r"^\[w(?P<index>\d+)\] worker (?P<pid>\d+) on study (?P<study>\S+)")


def _starts(stderr: str) -> dict[int, str]:
    """Worker index -> its start line."""
    return {int(m["index"]): line for line in stderr.splitlines() if (m := _START.match(line))}


def test_pool_runs_separate_processes_with_prefixed_output_and_exact_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "pool", num_trials=9, **budget_spec_args(tmp_path))
    done = cli(["optim", "--study-name", "pool", url, "run", *SLEEP, "--workers", "3", "--seed", "7"], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    starts = _starts(done.stderr)
    assert sorted(starts) == [0, 1, 2], done.stderr
    pids = {int(_START.match(line)["pid"]) for line in starts.values()}
    assert len(pids) == 3, starts  # three processes
    assert all(re.match(r"^\[w[012]\] ", line) for line in lines[:-1]), done.stderr
    finals = [line for line in lines if "worker done (" in line]
    assert len(finals) == 3, done.stderr
    assert lines[-1] == "3 workers done: 9 complete, 0 pruned, 0 fail, 0 handed back", done.stderr
    assert trial_states(url, "pool") == {"COMPLETE": 9}
    assert "Traceback" not in done.stderr


def test_gpus_pin_one_device_per_worker(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "gpus", num_trials=4, **budget_spec_args(tmp_path))
    done = cli(["optim", "--study-name", "gpus", url, "run", *SLEEP, "--workers", "3", "--gpus", "3,5"], tmp_path)
    assert done.returncode == 0, done.stderr
    starts = _starts(done.stderr)
    # worker i sees gpus[i % 2] and nothing else
    for index, gpu in ((0, "3"), (1, "5"), (2, "3")):
        assert f"CUDA_VISIBLE_DEVICES={gpu}" in starts[index], starts
    # Two workers on one GPU is fine for small models, but said once, before the workers start.
    first = done.stderr.splitlines()[0]
    assert first == (
        "stagetune: warning: --gpus 3,5: 3 workers share 2 GPUs (worker i on GPU i mod 2); "
        "fine for small models, else give one GPU id per worker"
    ), done.stderr
    assert done.stderr.count("warning") == 1, done.stderr


def test_gpus_for_fewer_workers_says_which_stay_idle() -> None:
    from stagetune.cli.optim import _gpu_sharing

    assert _gpu_sharing(["0", "1"], 2) is None  # one GPU per worker: nothing to say
    assert _gpu_sharing(["0"], 3).startswith("--gpus 0: 3 workers share one GPU")
    assert _gpu_sharing(["0", "1", "2"], 1) == (
        "--gpus 0,1,2 names 3 GPUs for 1 worker: GPUs 1,2 stay idle; add --workers 3 to use every one"
    )


def test_a_missing_study_is_one_error_before_any_worker_starts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "there", num_trials=4, **budget_spec_args(tmp_path))
    done = cli(["optim", "--study-name", "nosuch", url, "run", *SLEEP, "--workers", "4"], tmp_path)
    assert_one_line_error(done, "nosuch")
    assert "[w0]" not in done.stderr


def test_spawned_workers_where_fork_is_not_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "spawn", num_trials=4, **budget_spec_args(tmp_path))
    lines: list[str] = []
    code = run_pool(
        ["optim", "--study-name", "spawn", url, "run", *SLEEP], 2, main=main, seed=0, fork=False, out=lines.append
    )
    assert code == 0, lines
    assert sorted(_starts("\n".join(lines))) == [0, 1], lines
    assert lines[-1] == "2 workers done: 4 complete, 0 pruned, 0 fail, 0 handed back", lines
    assert trial_states(url, "spawn") == {"COMPLETE": 4}


def test_a_failing_worker_fails_the_pool_and_is_named(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    args = budget_spec_args(tmp_path)
    create_study(url, "fails", num_trials=4, **args)
    shutil.rmtree(args["data_dir"])  # the study opens; training data is gone: each worker fails
    done = cli(["optim", "--study-name", "fails", url, "run", "--workers", "2"], tmp_path)
    assert done.returncode != 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert sum(line.startswith("[w0] stagetune: error: ") for line in lines) == 1, done.stderr
    assert sum(line.startswith("[w1] stagetune: error: ") for line in lines) == 1, done.stderr
    assert "workers w0 (exit 1), w1 (exit 1) failed" in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_on_a_missing_database_creates_nothing(workers: str, tmp_path: Path) -> None:
    done = cli(["optim", "sqlite:///nodir/optim.db", "run", *SLEEP, "--workers", workers], tmp_path)
    assert_one_line_error(done, "no study database", "nodir/optim.db")
    assert list(tmp_path.iterdir()) == []
