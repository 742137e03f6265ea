"""``stagetune plan PLAN.ini submit`` under real Slurm daemons (a one-node test cluster).

A submitted plan runs on its own: per stage an init job and an array of workers,
the next stage only once the previous one met its budget (a gate job checks), then
the final model.  Submitting again submits only what is left.  A worker warned of
its time limit (``--signal=B:USR1@120``) hands its trial back and requeues.
"""

from __future__ import annotations

import json
import os
import re
import sys
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from optim_helpers import STAGETUNE, assert_one_line_error, opened_study, trial_states, wait_for, write_speech_data
from slurm_cluster import SlurmCluster

MODEL = "model.convolutional_layers=0 model.recurrent_layers=1 model.recurrent_size=8 data.batch_size=4"
JOBS = ["p-sm-init", "p-sm-work", "p-lg-init", "p-lg-work", "p-final"]


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(cpus=2)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def plan_path(tmp_path: Path) -> Path:
    write_speech_data(tmp_path / "train", 16)
    write_speech_data(tmp_path / "test", 6)
    path = tmp_path / "p.ini"
    path.write_text(
        "[plan]\ntrain = train\ntest = test\ndev_proportion = 0.25\nout_dir = out\nfinal = lg\n"
        "final_epochs = 1\nworkers = 2\nheartbeat_interval = 1\ngrace_period = 3\n"
        f"[sm]\nset = {MODEL}\nwhitelist = training\\.learning_rate training\\.dropout_prob\n"
        "epochs = 1\ntrials = 3\nsampler = random\nmetric = loss\nseed = 1\n"
        "[lg]\nfrom = sm\ntop_k = 1\ntrials = 2\n"
    )
    return path


def _submit(slurm: SlurmCluster, plan: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``stagetune plan PLAN submit`` in the plan's directory, talking to the test cluster."""
    return subprocess.run([*STAGETUNE, "plan", plan.name, "submit", *args], cwd=plan.parent, env=slurm.env(),
                          capture_output=True, text=True, timeout=120, check=False)


def _queue(slurm: SlurmCluster) -> str:
    return slurm.run("squeue", "-h", "-o", "%i %j %T %r").stdout.strip()


def _wait_idle(slurm: SlurmCluster, timeout: float) -> None:
    wait_for("the queue to empty", lambda: not _queue(slurm), timeout=timeout, interval=0.5)


def _logs(directory: Path) -> str:
    return "".join(f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(directory.glob("*.out")))


def test_a_submitted_plan_runs_stage_after_stage_to_the_final_model_and_a_resubmit_submits_nothing(
    slurm: SlurmCluster, plan_path: Path
) -> None:
    tmp = plan_path.parent
    url = f"sqlite:///{tmp / 'out' / 'optim.db'}"
    started = time.monotonic()
    done = _submit(slurm, plan_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.findall(r"^submitted (\S+): job \d+", done.stdout, re.M) == JOBS, done.stdout
    _wait_idle(slurm, timeout=240)
    elapsed = time.monotonic() - started
    logs = _logs(tmp / "out" / "slurm")
    assert "Traceback" not in logs and "has not met its budget" not in logs, logs

    # exact budgets, every trial finished
    assert trial_states(url, "p-sm") == {"COMPLETE": 3}, logs
    assert trial_states(url, "p-lg") == {"COMPLETE": 2}, logs
    # two workers per stage (array tasks 0 and 1 each ran one)
    assert len(list((tmp / "out" / "slurm").glob("p-sm-work-*_[01].out"))) == 2
    with opened_study(url, "p-sm") as sm, opened_study(url, "p-lg") as lg:
        sm_end = max(t.datetime_complete for t in sm.get_trials(deepcopy=False))
        lg_start = min(t.datetime_start for t in lg.get_trials(deepcopy=False))
    assert lg_start > sm_end, (sm_end, lg_start)

    result = json.loads((tmp / "out" / "final" / "result.json").read_text())
    assert result["study"] == "p-lg" and 0 <= result["test"]["rate"]

    # everything done: nothing to submit, nothing queued
    again = _submit(slurm, plan_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to submit" in again.stdout and "submitted" not in again.stdout.replace("not submitted", "")
    assert not _queue(slurm)
    print(f"plan on Slurm: {elapsed:.1f} s")


def test_a_stage_that_misses_its_budget_stops_the_chain_and_a_resubmit_takes_it_up(
    slurm: SlurmCluster, plan_path: Path
) -> None:
    tmp = plan_path.parent
    done = _submit(slurm, plan_path, "--sbatch-option=--hold")
    assert done.returncode == 0, done.stdout + done.stderr
    ids = dict(re.findall(r"^submitted (\S+): job (\d+)", done.stdout, re.M))
    # sm's workers are cancelled before they start, so sm misses its budget; the rest may run
    assert slurm.run("scancel", ids["p-sm-work"]).returncode == 0
    release = slurm.run("scontrol", "release", ",".join(ids[j] for j in JOBS[2:]))
    assert release.returncode == 0, release.stderr
    wait_for("the chain to stop", lambda: _queue(slurm).split()[1:3] == ["p-sm-init", "PENDING"]
             and len(_queue(slurm).splitlines()) == 1, timeout=120, interval=0.5)
    logs = tmp / "out" / "slurm"
    lg_init = next(logs.glob("p-lg-init-*.out")).read_text()
    assert "stagetune: error: stage sm has not met its budget (no study), so stage lg does not start" in lg_init
    final = next(logs.glob("p-final-*.out")).read_text()
    assert "stage lg has not met its budget (no study), so the final step does not start" in final
    assert not list(logs.glob("p-lg-work-*"))  # cancelled: its init job failed
    assert not (tmp / "out" / "final").exists()

    # jobs of the plan in the queue (the held sm-init) block a second submission
    blocked = _submit(slurm, plan_path)
    assert blocked.returncode == 1 and "has jobs in the queue already" in blocked.stderr, blocked.stderr
    assert slurm.run("scancel", ids["p-sm-init"]).returncode == 0
    _wait_idle(slurm, timeout=60)
    # a resubmit takes the plan up again from stage sm
    again = _submit(slurm, plan_path, "--sbatch-option=--hold")
    assert again.returncode == 0, again.stdout + again.stderr
    submitted = dict(re.findall(r"^submitted (\S+): job (\d+)", again.stdout, re.M))
    assert list(submitted) == JOBS, again.stdout
    assert slurm.run("scancel", *submitted.values()).returncode == 0
    _wait_idle(slurm, timeout=60)


def test_dry_run_prints_every_sbatch_command_and_submits_nothing(slurm: SlurmCluster, plan_path: Path) -> None:
    done = _submit(slurm, plan_path, "--dry-run", "--partition=debug", "--gres=gpu:1", "--time=10",
                   "--sbatch-option=--mem=100")
    assert done.returncode == 0, done.stderr
    sbatch = [line for line in done.stdout.splitlines() if "sbatch " in line]
    assert [re.search(r"--job-name=(\S+)", line)[1] for line in sbatch] == JOBS, done.stdout
    for line in sbatch:
        assert "--partition=debug" in line and "--time=10" in line and "--mem=100" in line, line
        assert ("--gres=gpu:1" in line) == ("-work" in line or "-final" in line), line
    work = [line for line in sbatch if "-work" in line]
    assert all("--array=0-1" in w and "--requeue" in w and "--signal=B:USR1@120" in w for w in work), work
    deps = [re.search(r"--dependency=(\S+)", line) for line in sbatch]
    assert [d[1] if d else None for d in deps] == [
        None, "afterok:$sm_init", "afterany:$sm_work", "afterok:$lg_init", "afterany:$lg_work"]
    # the gates: lg starts only when sm met its budget, the final step only when lg did
    assert "-m stagetune plan p.ini job init lg --after sm\n" in done.stdout
    assert "-m stagetune plan p.ini job final --after lg\n" in done.stdout
    assert not _queue(slurm)
    assert not (plan_path.parent / "out").exists()  # nothing written


def test_submit_without_slurm_says_what_is_missing_and_dry_run_needs_no_slurm(plan_path: Path) -> None:
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no sbatch on it
    run = [*STAGETUNE, "plan", plan_path.name]
    missing = subprocess.run([*run, "submit"], cwd=plan_path.parent, env=env, capture_output=True, text=True)
    assert_one_line_error(missing, "sbatch not found", "--dry-run")
    assert subprocess.run([*run, "submit", "--dry-run"], cwd=plan_path.parent, env=env).returncode == 0
    unknown = subprocess.run([*run, "job", "init", "md"], cwd=plan_path.parent, capture_output=True, text=True)
    assert_one_line_error(unknown, "no stage 'md' in p.ini; stages: sm, lg")
    assert unknown.returncode == 2


@pytest.mark.slow
def test_the_time_limit_warning_hands_the_trial_back_and_requeues_the_worker(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    write_speech_data(tmp_path / "train", 16)
    plan = tmp_path / "p.ini"
    plan.write_text(  # one long trial (many epochs), one worker
        "[plan]\ntrain = train\ndev_proportion = 0.25\nout_dir = out\nheartbeat_interval = 1\n"
        f"[sm]\nset = {MODEL}\nwhitelist = training\\.learning_rate\nepochs = 5000\ntrials = 1\nmetric = loss\n"
    )
    url = f"sqlite:///{tmp_path / 'out' / 'optim.db'}"
    done = _submit(slurm, plan)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = dict(re.findall(r"^submitted (\S+): job (\d+)", done.stdout, re.M))
    logs = tmp_path / "out" / "slurm"
    wait_for("the study", lambda: "created study p-sm" in "".join(p.read_text() for p in logs.glob("p-sm-init-*")),
             timeout=120, interval=0.5)
    wait_for("the trial to run", lambda: trial_states(url, "p-sm") == {"RUNNING": 1}, timeout=120, interval=0.5)
    # what --signal=B:USR1@120 sends to the batch shell before the time limit
    signal = slurm.run("scancel", "--batch", "--signal=USR1", f"{ids['p-sm-work']}_0")
    assert signal.returncode == 0, signal.stderr
    log = logs / f"p-sm-work-{ids['p-sm-work']}_0.out"
    wait_for("the requeue", lambda: "requeueing" in log.read_text(), timeout=120, interval=0.5)
    assert "trial 0 handed back for retry" in log.read_text(), log.read_text()
    assert trial_states(url, "p-sm") == {"FAIL": 1, "WAITING": 1}  # the retry waits for the next worker
    wait_for("the task to be requeued", lambda: re.search(
        r"JobState=PENDING .*Restarts=1", " ".join(slurm.run("scontrol", "show", "job", ids["p-sm-work"]).stdout.split())),
        timeout=60, interval=0.5)
    assert slurm.run("scancel", ids["p-sm-work"]).returncode == 0
    _wait_idle(slurm, timeout=60)
