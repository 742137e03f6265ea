"""``optim run`` when something outside the command line is wrong: a signal, a node's devices.

The real CLI in a subprocess on real SQLite studies. An interrupted run exits
with the shell's status for the signal (130 for SIGINT, 143 for SIGTERM), so
that ``run && next-stage`` stops, and still hands its trials back; a worker on a
node without the study's device stops before it claims anything. This machine
has no CUDA device, so the device cases are real. No test trains: the signal
cases run the ``sleep`` objective, the device cases fail before training.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from optim_helpers import (
    assert_one_line_error,
    budget_spec_args,
    cli,
    create_study,
    start_cli,
    stop_group,
    trial_states,
    wait_for,
)

from stagetune.config import load_config
from stagetune.errors import StagetuneError, UsageError
from stagetune.optim.storage import storage_session
from stagetune.optim.study import build_spec, init_study
from stagetune.optim.worker import check_device

#: The device cases are about a node without CUDA (as this one, and CI's).
without_cuda = pytest.mark.skipif(torch.cuda.device_count() > 0, reason="a CUDA device is visible")


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_exits_130_and_hands_the_trials_back(tmp_path: Path, workers: int) -> None:
    """SIGTERM (143) is covered with real training in test_optim_preemption.py."""
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "stage1", num_trials=4, **budget_spec_args(tmp_path))
    log = tmp_path / "run.log"
    run = start_cli(
        ["optim", "--study-name", "stage1", url, "run", "--objective", "sleep", "--sleep-seconds", "120",
         "--sampler", "random", "--workers", workers],
        tmp_path, log,
    )
    try:
        wait_for("every worker's trial to run", lambda: trial_states(url, "stage1")["RUNNING"] == workers)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
        returncode = run.wait(timeout=30)
    finally:
        stop_group(run)
    output = log.read_text()
    assert returncode == 130, output  # not 0: `run && next-stage` must stop here
    assert output.count("handed back for retry") == workers, output
    assert trial_states(url, "stage1") == {"FAIL": workers, "WAITING": workers}
    last = output.strip().splitlines()[-1]
    if workers == 1:
        assert last.startswith("worker done (SIGINT received)"), output
    else:
        assert last == "2 workers done: 0 complete, 0 pruned, 0 fail, 2 handed back; interrupted by SIGINT", output
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A database with studies ``on-cuda`` and ``plain``, as ``optim init`` creates them with and without
    ``--device cuda`` (init stores the device unchecked: it may run on a node without a GPU)."""
    root = tmp_path_factory.mktemp("devices")
    url = f"sqlite:///{root / 'optim.db'}"
    args = budget_spec_args(root)
    for name, device in (("on-cuda", "cuda"), ("plain", None)):
        spec = build_spec(
            load_config((), args["overrides"]), args["data_dir"], whitelist=args["whitelist"],
            num_trials=4, device=device,
        )
        with storage_session(url) as storage:
            init_study(storage, name, url, spec, log=lambda _message: None)
    return url


@without_cuda
def test_a_worker_on_a_node_without_the_studys_device_claims_nothing(studies: str, tmp_path: Path) -> None:
    # `--workers N` makes the same check once before it forks (the workers check again).
    done = cli(["optim", "--study-name", "on-cuda", studies, "run"], tmp_path)
    assert_one_line_error(
        done, "study 'on-cuda' trains on cuda (its optim init --device), but no CUDA device is visible on this node",
        "stagetune --device cpu optim ... run",
    )
    assert done.returncode == 1
    assert trial_states(studies, "on-cuda") == {}  # not three failed trials
    assert not (tmp_path / "stagetune-ckpt").exists()


@without_cuda
def test_gpus_on_a_node_without_cuda_is_an_error_not_a_cpu_run(studies: str, tmp_path: Path) -> None:
    done = cli(["optim", "--study-name", "plain", studies, "run", "--gpus", "0,1", "--workers", "2"], tmp_path)
    assert_one_line_error(done, "--gpus 0,1: no CUDA device is visible here; drop --gpus to train on the CPU")
    assert done.returncode == 2
    assert trial_states(studies, "plain") == {}


@without_cuda
def test_check_device_names_whose_device_is_missing() -> None:
    check_device("s", None, None)  # cuda where available, else cpu
    check_device("s", "cuda", "cpu")  # the worker's --device overrides the study's
    with pytest.raises(StagetuneError, match=r"study 's' trains on cuda:1 \(.*no CUDA device is visible"):
        check_device("s", "cuda:1", None)
    with pytest.raises(UsageError, match="--device cuda: no CUDA device is visible"):
        check_device("s", None, "cuda")
    with pytest.raises(UsageError, match="'gpu' is not a torch device"):
        check_device("s", "gpu", None)
