"""``optim run --workers N`` (stagetune.optim.pool): N real worker processes on one study.

The pool forks its workers after importing once (Linux) or starts fresh
interpreters; either way each worker is its own process, its lines carry a
``[wI]`` prefix, ``--gpus`` pins one GPU per worker through
CUDA_VISIBLE_DEVICES, and the pool ends with one combined summary. SIGTERM to
the pool is covered in test_optim_preemption.py.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from optim_helpers import assert_one_line_error, budget_spec_args, cli, create_study, trial_states

from stagetune.cli.pool_child import serve
from stagetune.optim.pool import run_pool
from stagetune.optim.worker import WorkerOptions

SLEEP = ["--objective", "sleep", "--sleep-seconds", "0.05", "--sampler", "random"]
SLEEP_OPTIONS = WorkerOptions(objective="sleep", sleep_seconds=0.05, sampler="random")
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
    options = dataclasses.replace(SLEEP_OPTIONS, seed=0, ckpt_dir=tmp_path / "ckpt")
    result = run_pool(url, "spawn", options, 2, serve=serve, fork=False, out=lines.append)
    assert result.exit_code() == 0, lines
    assert sorted(_starts("\n".join(lines))) == [0, 1], lines
    assert lines[-1] == "2 workers done: 4 complete, 0 pruned, 0 fail, 0 handed back", lines
    assert trial_states(url, "spawn") == {"COMPLETE": 4}
    # Each spawned worker's summary came back as data.
    assert all(s is not None for s in result.summaries), lines
    for index, summary in enumerate(result.summaries):
        assert f"[w{index}] {summary.line()}" in lines, lines
    assert sum(s.counts["COMPLETE"] for s in result.summaries if s) == 4, result


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


def test_worker_options_survive_the_json_a_spawned_worker_gets() -> None:
    import json

    odd = Path(os.fsdecode(b"ckpt-\xff dir"))  # not UTF-8: as a file system may name it
    options = dataclasses.replace(SLEEP_OPTIONS, ckpt_dir=odd, tensorboard=Path("tb"), seed=3, n_trials=2)
    back = WorkerOptions.from_dict(json.loads(json.dumps(options.to_dict())))
    assert back == options
    assert isinstance(back.ckpt_dir, Path) and isinstance(back.tensorboard, Path)


def test_the_pool_gets_each_workers_summary_as_data_and_none_from_a_killed_one(tmp_path: Path) -> None:
    """The pool's totals are what each worker really did, sent as data: a worker killed
    with SIGKILL sends nothing and fails the pool with 137, while the other finishes
    the study (retrying the killed worker's trial once its heartbeat is stale)."""
    from stagetune.optim.report import WORKER_ATTR
    from optim_helpers import opened_study

    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "kill", num_trials=8, **budget_spec_args(tmp_path))
    options = dataclasses.replace(
        SLEEP_OPTIONS, sleep_seconds=0.3, seed=5, heartbeat_interval=1, grace_period=2, ckpt_dir=tmp_path / "ckpt"
    )
    lines: list[str] = []

    def kill_w1() -> None:
        deadline = time.monotonic() + 60
        while 1 not in _starts("\n".join(lines)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # into its trials
        os.kill(int(_START.match(_starts("\n".join(lines))[1])["pid"]), signal.SIGKILL)

    killer = threading.Thread(target=kill_w1, daemon=True)
    killer.start()
    result = run_pool(url, "kill", options, 2, serve=serve, out=lines.append)
    killer.join()
    log = "\n".join(lines)
    assert result.codes == [0, 128 + signal.SIGKILL], log
    assert result.summaries[1] is None, log
    w0 = result.summaries[0]
    # w1's last trial may still hold its slot (RUNNING until it turns stale) when w0 stops.
    assert w0 is not None and w0.stop_reason.startswith(("budget of 8 trials met", "every remaining slot")), log
    # Worker 0's counts and best are its trials in the database (its seed too: seed + 0).
    pid0 = _START.match(_starts(log)[0])["pid"]
    with opened_study(url, "kill") as study:
        mine = [t for t in study.get_trials() if t.user_attrs.get(WORKER_ATTR, "").endswith(f":{pid0}")]
        complete = [t for t in mine if t.state.name == "COMPLETE"]
        assert w0.counts["COMPLETE"] == len(complete) > 0, log
        best = min(complete, key=lambda t: t.value)
        assert w0.best == (best.number, best.value)
        states = [t.state.name for t in study.get_trials()]
        if w0.stop_reason.startswith("budget of 8 trials met"):  # w0 retried w1's trial once stale
            assert states.count("COMPLETE") == 8, log
        else:  # w1's trial still held its slot: RUNNING, for the next worker to retry
            assert states.count("COMPLETE") == 7 and states.count("RUNNING") == 1, log
    assert lines[-1] == (
        f"2 workers done: {len(complete)} complete, 0 pruned, 0 fail, 0 handed back; workers w1 (exit 137) failed"
    ), log
    assert result.exit_code() == 137
