"""Submit a plan to Slurm: per stage an init job and an array of workers, then the final job.

The jobs do what ``plan run`` (:mod:`.runner`) does, chained with ``--dependency``
so that a stage starts only once the stage before it has met its budget::

    sm-init                      plan job init sm: optim init, recorded as plan run does
    sm-work  afterok:sm-init     --array=0-(N-1): one ``optim run`` worker per task
    lg-init  afterany:sm-work    plan job init lg --after sm: exit 1 unless sm met its
                                 budget (what ``optim status --check`` checks), then init
    lg-work  afterok:lg-init     the workers of lg
    final    afterany:lg-work    plan job final --after lg: best, train, evaluate

``afterany`` lets a stage follow an array whatever its tasks' exit status (a
task that crashed or was cancelled leaves its trial to the others), and the gate
decides: when the budget is not met, the gate job fails, the jobs that wait on
it with ``afterok`` are cancelled (``--kill-on-invalid-dep=yes``), and so on down
the chain.  Submitting again submits only what is left: stages whose budget is
met (under the settings the plan recorded) and a trained final model are skipped.

Workers are submitted with ``--requeue --signal=B:USR1@120``: their job script
turns Slurm's USR1 (two minutes before the time limit) and SIGTERM (preemption)
into a SIGTERM to the worker, which checkpoints its trial and hands it back;
after USR1 the task requeues itself unless the stage's budget is met, and the
next task (or this one, requeued) resumes the trial from its checkpoint.
``slurm/optim-worker.sbatch`` has the same body (:data:`WORKER_BODY`).

Each job's ``--partition``, ``--time``, ``--gres`` (workers and final only) and
extra sbatch options come from the plan file (a stage's own, else ``[plan]``'s;
the final job: ``[plan]``'s), overridden by ``plan submit``'s options.

The job scripts are written to ``OUT_DIR/slurm/`` (their logs go there too);
``--dry-run`` prints the whole submission as a shell script instead.
"""

from __future__ import annotations

import getpass
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from stagetune.errors import StagetuneError, UsageError
from stagetune.plan.runner import (
    Child, final_done, final_paths, final_step, init_argv, init_stage, recorded, run_argv, stage_state,
)
from stagetune.plan.slurm_keys import SIGNAL_SECONDS
from stagetune.plan.spec import Plan, Stage

__all__ = [
    "SlurmOptions", "Job", "SIGNAL_SECONDS", "WORKER_BODY", "plan_jobs", "render_dry_run", "submit_plan", "run_job",
]


@dataclass(frozen=True)
class SlurmOptions:
    """``plan submit``'s options: they override the plan file's settings for every job.

    ``gres`` goes only to the jobs that train (workers and final); ``extra`` comes
    after the plan's ``sbatch`` options (sbatch takes the last of a repeated option).
    """

    partition: str | None = None
    gres: str | None = None
    time: str | None = None
    extra: tuple[str, ...] = ()
    workers: int | None = None  # array tasks per stage; default: the stage's, else the plan's workers


def _slurm_settings(plan: Plan, stage: Stage | None, options: SlurmOptions) -> tuple[list[str], list[str], list[str]]:
    """(options of every job of ``stage``, or of the final job when None; gres; extra sbatch options)."""
    def pick(key: str) -> str | None:
        return getattr(options, key) or (getattr(stage, key) if stage else None) or getattr(plan, key)

    common = [f"--partition={pick('partition')}"] if pick("partition") else []
    common += [f"--time={pick('time')}"] if pick("time") else []
    gres = [f"--gres={pick('gres')}"] if pick("gres") else []
    extra = [*plan.sbatch, *(stage.sbatch if stage else ()), *options.extra]
    return common, gres, extra


@dataclass(frozen=True)
class Job:
    """One ``sbatch`` call: its script, its options and the job it waits for."""

    var: str  # a shell variable for its job id (dry run)
    name: str  # the Slurm job name
    what: str  # one line for people
    script: str  # the batch script's text
    options: tuple[str, ...]  # sbatch options, without --dependency
    path: Path  # where the script is written
    after: tuple[str, str] | None = None  # (afterok|afterany, var of that job)


def _python() -> str:
    return shlex.quote(sys.executable) + " -m stagetune"


def _command(argv: Sequence[str]) -> str:
    return f"{_python()} {shlex.join(argv)}"


def _header(plan: Plan, what: str) -> str:
    return (
        "#!/bin/bash\n"
        f"# stagetune plan {plan.name} ({plan.path}): {what}\n"
        f"# Written by `stagetune plan {plan.path} submit`, run by Slurm.\n"
        "set -u\n"
    )


def _worker_script(plan: Plan, stage: Stage) -> str:
    argv = run_argv(plan, stage, 1)
    i = argv.index("--workers")
    del argv[i:i + 2]  # one worker per array task
    i = argv.index("--seed")
    seed = int(argv.pop(i + 1))
    argv.pop(i)
    # task i gets seed + i, as worker i of a local pool does
    run = f'{_command(argv)} --seed "$(({seed} + ${{SLURM_ARRAY_TASK_ID:-0}}))"'
    check = _command(["optim", "--study-name", plan.study_name(stage.name), plan.url, "status", "--check"])
    return _header(plan, f"stage {stage.name}, one worker per array task") + WORKER_BODY.format(
        run=run, check=check, what="stagetune plan")


#: The body of a worker's job script, shared with ``slurm/optim-worker.sbatch``
#: (``{run}``: the worker, ``{check}``: exit 0 when the budget is met).
WORKER_BODY = """\
# Slurm's USR1 (--signal=B:USR1@120 before the time limit, or scancel --signal=USR1) and
# SIGTERM (preemption) reach the worker as SIGTERM: it checkpoints its trial and hands it
# back. After USR1 this task requeues itself unless the study's budget is met (the next
# worker, or this one requeued, resumes the trial from its checkpoint).
trap '' USR1  # the worker ignores USR1 itself (scancel --full signals every process)
{run} &
worker=$!
requeue=0
trap 'requeue=1; kill -TERM "$worker" 2>/dev/null' USR1
trap 'kill -TERM "$worker" 2>/dev/null' TERM
status=0
wait "$worker" || status=$?
# a trapped signal ends wait early: wait again until the worker has exited
while kill -0 "$worker" 2>/dev/null; do status=0; wait "$worker" || status=$?; done
if [ "$requeue" = 1 ] && [ "$status" != 0 ]; then
  if {check} >/dev/null; then
    echo "{what}: the study's budget is met; not requeueing ${{SLURM_JOB_ID:-}}" >&2
  else
    echo "{what}: trial handed back; requeueing ${{SLURM_JOB_ID:-}}" >&2
    scontrol requeue "${{SLURM_JOB_ID:?}}"
  fi
fi
exit "$status"
"""


def _job_argv(plan: Plan, step: str, stage: str | None, after: str | None, force: bool) -> list[str]:
    argv = ["plan", str(plan.path), "job", step, *([stage] if stage else [])]
    return argv + (["--after", after] if after else []) + (["--force"] if force else [])


def _stage_done(plan: Plan, stage: Stage) -> dict[str, Any] | None:
    """The stage's state when its budget is met under the settings the plan recorded (else None)."""
    state = stage_state(plan, stage)
    if state is None or not state["budget_met"]:
        return None
    # as plan run: settings not recorded by the plan may differ (optim init will tell)
    return state if recorded(plan, stage, state) else None


def _var(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name)
    var, n = base, 2
    while var in taken:
        var, n = f"{base}_{n}", n + 1
    taken.add(var)
    return var


def plan_jobs(
    plan: Plan, options: SlurmOptions, *, force: bool = False, say: Callable[[str], None] = print
) -> list[Job]:
    """The jobs still to submit, in order (each one's dependency comes before it)."""
    log_dir = Path(plan.out_dir) / "slurm"
    jobs: list[Job] = []
    taken: set[str] = set()
    previous: tuple[str, str] | None = None  # (stage, var) of the last array submitted

    def add(name: str, what: str, script: str, opts: list[str], after: tuple[str, str] | None,
            stage: Stage | None, trains: bool) -> Job:
        common, gres, extra = _slurm_settings(plan, stage, options)
        job = Job(var=_var(name.removeprefix(f"{plan.name}-"), taken), name=name, what=what, script=script,
                  options=(f"--job-name={name}", f"--chdir={os.getcwd()}", *common, *opts,
                           *(gres if trains else ()), *extra),
                  after=after, path=log_dir / f"{name}.sh")
        jobs.append(job)
        return job

    for stage in plan.stages:
        state = _stage_done(plan, stage)
        if state is not None:
            say(f"stage {stage.name}: budget met ({state['finished']}/{state['num_trials']} trials); not submitted")
            continue
        workers = options.workers or plan.stage_workers(stage)
        what = f"stage {stage.name}: initialise the study"
        script = _header(plan, what) + (
            f"# {'Once stage ' + previous[0] + ' has met its budget, r' if previous else 'R'}uns (and records "
            f"in the study) what plan run would:\n#   stagetune {shlex.join(init_argv(plan, stage, force=force))}\n"
            + "exec " + _command(_job_argv(plan, "init", stage.name, previous[0] if previous else None, force)) + "\n"
        )
        init = add(f"{plan.name}-{stage.name}-init", what, script, [f"--output={log_dir}/%x-%j.out"],
                   None if previous is None else ("afterany", previous[1]), stage, trains=False)
        work = add(
            f"{plan.name}-{stage.name}-work", f"stage {stage.name}: {workers} worker{'s' * (workers > 1)} "
            f"to {stage.trials} trials", _worker_script(plan, stage),
            [f"--array=0-{workers - 1}", f"--output={log_dir}/%x-%A_%a.out", "--open-mode=append", "--requeue",
             f"--signal=B:USR1@{SIGNAL_SECONDS}"],
            ("afterok", init.var), stage, trains=True,
        )
        previous = (stage.name, work.var)

    if plan.final is not None and (previous is not None or final_done(plan) is None):
        what = f"final: train and evaluate stage {plan.final}'s best config"
        script = _header(plan, what) + (
            f"# {'Once stage ' + previous[0] + ' has met its budget: o' if previous else 'O'}ptim best, "
            "train, evaluate, as plan run does\n"
            + "exec " + _command(_job_argv(plan, "final", None, previous[0] if previous else None, force)) + "\n"
        )
        add(f"{plan.name}-final", what, script, [f"--output={log_dir}/%x-%j.out"],
            None if previous is None else ("afterany", previous[1]), None, trains=True)
    elif plan.final is not None:
        say(f"final: trained already: {final_paths(plan)['model_dir']}; not submitted")
    return jobs


def _sbatch_argv(job: Job, dependency: str | None) -> list[str]:
    argv = ["sbatch", "--parsable", *job.options]
    if dependency is not None:
        argv += [f"--dependency={dependency}", "--kill-on-invalid-dep=yes"]
    return argv + [str(job.path)]


def render_dry_run(plan: Plan, jobs: Sequence[Job]) -> str:
    """The submission as a bash script: writing each job script, then its sbatch command."""
    from stagetune.optim.storage import mask_url

    lines = [f"# stagetune plan {plan.name}: {len(jobs)} jobs (dry run: nothing written or submitted)",
             f"mkdir -p {shlex.quote(str(Path(plan.out_dir) / 'slurm'))}"]
    for job in jobs:
        script = job.script.replace(plan.url, mask_url(plan.url))
        lines += [f"# {job.what}", f"cat > {shlex.quote(str(job.path))} <<'EOF'", script.rstrip("\n"), "EOF"]
        dependency = None if job.after is None else f"{job.after[0]}:${job.after[1]}"  # the shell's variable
        text = " ".join(a if a.startswith("--dependency=") else shlex.quote(a) for a in _sbatch_argv(job, dependency))
        lines.append(f"{job.var}=$({text})")
    return "\n".join(lines) + "\n"


def _slurm_command(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StagetuneError(
            f"{name} not found: plan submit needs Slurm's client commands on PATH "
            f"(--dry-run prints the submission without them)"
        )
    return path


def _queued(plan: Plan, jobs: Sequence[Job]) -> list[str]:
    """This user's queued or running jobs that carry the names of this plan's jobs."""
    names = sorted({j.name for j in jobs} | {f"{plan.name}-{s.name}-{k}" for s in plan.stages
                                              for k in ("init", "work")} | {f"{plan.name}-final"})
    done = subprocess.run(
        [_slurm_command("squeue"), "-h", "-u", getpass.getuser(), "-o", "%i %j", f"--name={','.join(names)}"],
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise StagetuneError(f"squeue failed (exit {done.returncode}): {done.stderr.strip()}")
    return [line for line in done.stdout.splitlines() if line.strip()]


def submit_plan(
    plan: Plan,
    options: SlurmOptions,
    *,
    dry_run: bool = False,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """Submit what is left of ``plan`` (or print it, with ``dry_run``); the exit status."""
    if options.workers is not None and options.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {options.workers}")
    # in a dry run, notes are shell comments: the output stays a runnable script
    jobs = plan_jobs(plan, options, force=force, say=(lambda line: say(f"# {line}")) if dry_run else say)
    if not jobs:
        say(f"plan {plan.name}: nothing to submit (every stage met its budget"
            + (", final model trained)" if plan.final else ")"))
        return 0
    if dry_run:
        say(render_dry_run(plan, jobs).rstrip("\n"))
        return 0
    sbatch = _slurm_command("sbatch")
    queued = _queued(plan, jobs)
    if queued:
        raise StagetuneError(
            f"plan {plan.name} has jobs in the queue already ({'; '.join(queued)}); "
            f"let them finish or scancel them, then submit again"
        )
    (Path(plan.out_dir) / "slurm").mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    try:
        for job in jobs:
            job.path.write_text(job.script)
            job.path.chmod(0o700)  # it may hold the database URL
            dependency = None if job.after is None else f"{job.after[0]}:{ids[job.after[1]]}"
            argv = _sbatch_argv(job, dependency)
            done = subprocess.run([sbatch, *argv[1:]], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise StagetuneError(
                    f"sbatch refused {job.name} (exit {done.returncode}): "
                    f"{' '.join(done.stderr.split()) or done.stdout.strip()}"
                    + ("; the jobs submitted before it were cancelled" if ids else "")
                )
            ids[job.var] = done.stdout.strip().split(";")[0]
            say(f"submitted {job.name}: job {ids[job.var]} ({job.what})")
    except BaseException:
        if ids:
            subprocess.run([_slurm_command("scancel"), *ids.values()], capture_output=True, check=False)
        raise
    say(f"plan {plan.name}: {len(jobs)} jobs submitted; logs in {Path(plan.out_dir) / 'slurm'}; "
        f"follow with: stagetune plan {plan.path} status")
    return 0


def _check_budget_met(plan: Plan, stage_name: str, then: str) -> None:
    """The gate of a job that waits for a stage's workers (afterany): exit 1 unless the budget is met."""
    state = stage_state(plan, plan.stage(stage_name))
    if state is None or not state["budget_met"]:
        got = "no study" if state is None else f"{state['finished']}/{state['num_trials']} trials"
        raise StagetuneError(
            f"stage {stage_name} has not met its budget ({got}), so {then} does not start; see the logs of "
            f"its workers in {Path(plan.out_dir) / 'slurm'}, then submit again to continue: "
            f"stagetune plan {plan.path} submit"
        )


def run_job(
    plan: Plan,
    step: str,
    stage_name: str | None = None,
    *,
    after: str | None = None,
    force: bool = False,
    say: Callable[[str], None] = print,
) -> int:
    """One job of a submitted plan: ``init`` a stage (as ``plan run`` does) or the ``final`` step.

    ``after``: the stage whose workers the job waited for; unless that stage met its
    budget the job fails (exit 1), so the jobs that wait on it with ``afterok`` never run.
    """
    names = [s.name for s in plan.stages]
    for name in (stage_name, after):
        if name is not None and name not in names:
            raise UsageError(f"no stage {name!r} in {plan.path}; stages: {', '.join(names)}")
    if step == "init":
        if stage_name is None:
            raise UsageError("plan job init needs the STAGE to initialise")
        if after is not None:
            _check_budget_met(plan, after, f"stage {stage_name}")
        return init_stage(plan, plan.stage(stage_name), Child(), say, force=force)
    if step == "final":
        if plan.final is None:
            raise UsageError(f"{plan.path} has no final step ([plan] final = STAGE)")
        if after is not None:
            _check_budget_met(plan, after, "the final step")
        return final_step(plan, Child(), say)
    raise UsageError(f"plan job: unknown step {step!r}; steps: init, final")
