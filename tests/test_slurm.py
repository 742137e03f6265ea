"""``slurm/optim-worker.sbatch`` under real Slurm daemons (a one-node test cluster).

An sbatch array is the cluster way to start many workers on one study: the
budget must come out exact on every backend, and Slurm's preemption signal
(``scancel --signal=TERM``, what preemption sends) must
reach the worker, which hands its trial back for the next worker to retry.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterator

import pytest
from fixtures_db import TEST_DB_PASSWORD
from optim_helpers import budget_spec_args, create_study, opened_study, trial_states, wait_for
from slurm_cluster import SlurmCluster

SBATCH = Path(__file__).resolve().parents[1] / "slurm" / "optim-worker.sbatch"
# the job environment: the submitter's (sbatch --export=ALL), with this venv's stagetune first
VENV_PATH = {"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(cpus=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _outputs(directory: Path, job_id: str) -> dict[int, str]:
    """Array task id -> the text of its output file (``%x-%A_%a.out``)."""
    return {
        int(re.search(r"_(\d+)\.out$", p.name)[1]): p.read_text()
        for p in directory.glob(f"stagetune-{job_id}_*.out")
    }


def _sbatch(slurm: SlurmCluster, cwd: Path, *args: str, wait: bool) -> str:
    done = slurm.run(
        "sbatch", "--parsable", *(["--wait"] if wait else []), "--cpus-per-task=1", f"--chdir={cwd}",
        *args, env=VENV_PATH, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().split(";")[0]


def test_an_sbatch_array_of_workers_meets_the_budget_exactly(
    slurm: SlurmCluster, storage_url: str, tmp_path: Path
) -> None:
    create_study(storage_url, "slurm", num_trials=10, **budget_spec_args(tmp_path))
    job = _sbatch(
        slurm, tmp_path, "--array=0-3", str(SBATCH), storage_url, "slurm",
        "--objective", "sleep", "--sleep-seconds", "0.2", wait=True,
    )
    outputs = _outputs(tmp_path, job)
    assert sorted(outputs) == [0, 1, 2, 3], outputs
    complete = 0
    for task, text in outputs.items():
        assert re.search(r"^worker \d+ on study slurm in ", text, re.M), text
        final = text.strip().splitlines()[-1]
        assert final.startswith("worker done ("), text
        complete += int(re.search(r"\): (\d+) complete", final)[1])
        assert TEST_DB_PASSWORD not in text and "Traceback" not in text
    assert complete == 10
    assert trial_states(storage_url, "slurm") == {"COMPLETE": 10}


def test_slurms_sigterm_hands_the_trial_back_and_the_next_task_retries_it(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "preempt", num_trials=1, **budget_spec_args(tmp_path))
    long = ["--objective", "sleep", "--sleep-seconds", "120"]
    job = _sbatch(slurm, tmp_path, "--array=0", str(SBATCH), url, "preempt", *long, wait=False)
    wait_for("the trial to run", lambda: trial_states(url, "preempt") == {"RUNNING": 1}, timeout=120)
    # what Slurm sends on preemption: the script forwards the batch step's SIGTERM
    # to the worker (and, unlike after --signal=B:USR1@120, does not requeue itself)
    cancel = slurm.run("scancel", "--batch", "--signal=TERM", job)
    assert cancel.returncode == 0, cancel.stderr
    wait_for("the job to end", lambda: not slurm.run("squeue", "-h", "-j", job).stdout.strip(), timeout=120)
    text = _outputs(tmp_path, job)[0]
    assert "handed back for retry" in text, text
    assert text.strip().splitlines()[-1].startswith("worker done (SIGTERM received)"), text
    assert trial_states(url, "preempt") == {"FAIL": 1, "WAITING": 1}

    # the next array task takes the retry, with the same parameters
    retry_job = _sbatch(slurm, tmp_path, "--array=0", str(SBATCH), url, "preempt",
                        "--objective", "sleep", "--sleep-seconds", "0.2", wait=True)
    final = _outputs(tmp_path, retry_job)[0].strip().splitlines()[-1]
    assert re.search(r"^worker done \(budget of 1 trials? met\): 1 complete", final), final
    assert trial_states(url, "preempt") == {"FAIL": 1, "COMPLETE": 1}
    with opened_study(url, "preempt") as study:
        failed, retried = study.get_trials(deepcopy=False)
        assert retried.params == failed.params
