"""``stagetune plan PLAN.ini submit`` under real Slurm daemons (a one-node test cluster).

A submitted plan runs on its own: per stage an init job and an array of workers,
the next stage only once the previous one met its budget (a gate job checks), then
the final model.  Submitting again submits only what is left.  A worker warned of
its time limit (``--signal=B:USR1@120``) hands its trial back and requeues.
"""

from __future__ import annotations

import csv
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
from optuna.trial import TrialState
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
    # Slurm settings from the plan file: [plan]'s for every job, lg's own time limit for its jobs
    text = plan_path.read_text().replace("grace_period = 3\n", "grace_period = 3\npartition = debug\ntime = 10\n")
    plan_path.write_text(text.replace("trials = 2\n", "trials = 2\ntime = 15\n"))
    started = time.monotonic()
    done = _submit(slurm, plan_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.findall(r"^submitted (\S+): job \d+", done.stdout, re.M) == JOBS, done.stdout
    ids = dict(re.findall(r"^submitted (\S+): job (\d+)", done.stdout, re.M))
    for job, limit in (("p-sm-init", "00:10:00"), ("p-sm-work", "00:10:00"), ("p-lg-work", "00:15:00"),
                       ("p-final", "00:10:00")):
        shown = slurm.run("scontrol", "show", "job", ids[job]).stdout
        assert f"TimeLimit={limit}" in shown and "Partition=debug" in shown, (job, shown)
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


def test_the_worker_template_and_the_plans_worker_jobs_share_one_body() -> None:
    """``slurm/optim-worker.sbatch`` forwards, hands back and requeues as the tested plan jobs do."""
    from stagetune.plan.slurm import WORKER_BODY

    template = (Path(__file__).resolve().parents[1] / "slurm" / "optim-worker.sbatch").read_text()
    body = WORKER_BODY.format(
        run='stagetune optim --study-name "$study" "$url" run --seed "${SLURM_ARRAY_TASK_ID:-0}" '
            '--ckpt-dir "${STAGETUNE_CKPT_DIR:-stagetune-ckpt}" "$@"',
        check='stagetune optim --study-name "$study" "$url" status --check', what="optim-worker.sbatch")
    assert body in template
    assert "#SBATCH --requeue\n" in template and "#SBATCH --signal=B:USR1@120\n" in template


def _sbatch_lines(stdout: str) -> dict[str, str]:
    """Job name -> its sbatch command in a dry run's output."""
    lines = [line for line in stdout.splitlines() if "sbatch " in line]
    return {re.search(r"--job-name=(\S+)", line)[1]: line for line in lines}


def test_the_plan_files_slurm_settings_reach_every_sbatch_command_and_submits_options_override_them(
    plan_path: Path,
) -> None:
    # [plan]: every job's; a stage's own replace them (sbatch: after [plan]'s); lg inherits sm's
    plan_path.write_text(
        plan_path.read_text()
        .replace("grace_period = 3\n", "grace_period = 3\npartition = debug\ngres = gpu:1\ntime = 10\n"
                 "sbatch = --qos=normal --account='my proj'\n")
        .replace("seed = 1\n", "seed = 1\npartition = long\nsbatch = --mem=100\nworkers = 3\n")
        .replace("trials = 2\n", "trials = 2\ntime = 1-00:00:00\n")
    )
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no Slurm needed for a dry run
    run = [*STAGETUNE, "plan", plan_path.name, "submit", "--dry-run"]
    done = subprocess.run(run, cwd=plan_path.parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    sbatch = _sbatch_lines(done.stdout)
    assert list(sbatch) == JOBS, done.stdout
    extra = "--qos=normal '--account=my proj'"
    expected = {  # (partition, time, gres, extra sbatch options, array)
        "p-sm-init": ("long", "10", None, f"{extra} --mem=100", None),
        "p-sm-work": ("long", "10", "gpu:1", f"{extra} --mem=100", "0-2"),
        "p-lg-init": ("long", "1-00:00:00", None, f"{extra} --mem=100", None),
        "p-lg-work": ("long", "1-00:00:00", "gpu:1", f"{extra} --mem=100", "0-2"),
        "p-final": ("debug", "10", "gpu:1", extra, None),
    }
    for job, (partition, limit, gres, options, array) in expected.items():
        line = sbatch[job]
        assert f"--partition={partition} " in line and f"--time={limit} " in line, line
        assert (re.search(r"--gres=(\S+)", line) or [None, None])[1] == gres, line
        assert f" {options} " in line, line
        assert (re.search(r"--array=(\S+)", line) or [None, None])[1] == array, line

    # submit's options override the file for every job; --sbatch-option comes after its options
    over = subprocess.run([*run, "--partition=cli", "--time=3:00", "--gres=gpu:2", "--workers=1",
                           "--sbatch-option=--qos=high"], cwd=plan_path.parent, env=env, capture_output=True,
                          text=True)
    assert over.returncode == 0, over.stderr
    for job, line in _sbatch_lines(over.stdout).items():
        assert "--partition=cli " in line and "--time=3:00 " in line and "--partition=long" not in line, line
        assert ("--gres=gpu:2 " in line) == (job.endswith(("-work", "-final"))), line
        assert re.search(r" --qos=high (--dependency=\S+ --kill-on-invalid-dep=yes )?\S+\.sh\)$", line), line
        assert "--array" not in line or "--array=0-0 " in line, line

    # a bad option is one line naming it (checked as the file's keys are), and nothing is printed or written
    refused = subprocess.run([*run, "--sbatch-option=--array=0-9"], cwd=plan_path.parent, env=env,
                             capture_output=True, text=True)
    assert_one_line_error(refused, "--sbatch-option '--array=0-9': --array: the plan sets --array of its jobs "
                                   "itself; use the workers key (or submit --workers)")
    assert refused.returncode == 2 and not refused.stdout
    assert not (plan_path.parent / "out").exists()


def _history(trial_dir: Path) -> list[dict[str, str]]:
    with (trial_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def _running_epoch(url: str, name: str) -> int:
    """The last epoch of the study's running trial (0 before any, or before the study exists)."""
    if not Path(url.removeprefix("sqlite:///")).exists():
        return 0
    try:
        with opened_study(url, name) as study:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    except Exception:  # the init job is still creating the database or the study
        return 0
    return int(running[0].user_attrs.get("epoch", 0)) if running else 0


@pytest.mark.slow
def test_a_worker_signalled_before_its_time_limit_hands_its_trial_back_requeues_and_the_next_task_resumes_it(
    slurm: SlurmCluster, tmp_path: Path
) -> None:
    write_speech_data(tmp_path / "train", 16)
    plan = tmp_path / "p.ini"
    plan.write_text(  # one long trial (many epochs), two array tasks that run one at a time (2 CPUs each)
        "[plan]\ntrain = train\ndev_proportion = 0.25\nout_dir = out\nheartbeat_interval = 1\n"
        "grace_period = 3\nworkers = 2\nsbatch = --cpus-per-task=2\n"
        f"[sm]\nset = {MODEL}\nwhitelist = training\\.learning_rate\nepochs = 5000\ntrials = 1\nmetric = loss\n"
    )
    url = f"sqlite:///{tmp_path / 'out' / 'optim.db'}"
    done = _submit(slurm, plan)
    assert done.returncode == 0, done.stdout + done.stderr
    work = dict(re.findall(r"^submitted (\S+): job (\d+)", done.stdout, re.M))["p-sm-work"]
    logs = tmp_path / "out" / "slurm"
    trial_dir = tmp_path / "out" / "ckpt" / "p-sm" / "trial-0"
    try:
        wait_for("trial 0 to finish an epoch", lambda: _running_epoch(url, "p-sm") >= 1, timeout=120, interval=0.5)
        # what --signal=B:USR1@120 sends before the time limit; --full: the worker gets it too
        signal = slurm.run("scancel", "--full", "--signal=USR1", f"{work}_0")
        assert signal.returncode == 0, signal.stderr
        first = logs / f"p-sm-work-{work}_0.out"
        wait_for("task 0 to requeue", lambda: "requeueing" in first.read_text(), timeout=60, interval=0.5)
        assert "trial 0 handed back for retry" in first.read_text(), first.read_text()
        before = _history(trial_dir)
        assert before, "no epoch finished before the signal"
        # task 1 takes the trial over and continues it from its checkpoint
        wait_for("the retry to train an epoch", lambda: _running_epoch(url, "p-sm") > len(before),
                 timeout=90, interval=0.5)
        with opened_study(url, "p-sm") as study:
            trials = study.get_trials(deepcopy=False)
        assert [t.state for t in trials] == [TrialState.FAIL, TrialState.RUNNING]  # the same trial, no other
        assert trials[1].system_attrs["failed_trial"] == 0 and trials[1].params == trials[0].params
        after = _history(trial_dir)
        assert after[: len(before)] == before  # the epochs before the signal were not trained again
        assert int(after[len(before)]["epoch"]) == len(before) + 1
        assert "handed back" not in (logs / f"p-sm-work-{work}_1.out").read_text()
        # task 0 waits in the queue, requeued, for what may be left
        job = " ".join(slurm.run("scontrol", "show", "job", f"{work}_0").stdout.split())
        assert re.search(r"JobState=PENDING .*Restarts=1", job), job
    finally:
        slurm.run("scancel", work)
    _wait_idle(slurm, timeout=60)
