"""``stagetune plan PLAN.ini run|status|submit``: a staged search declared in a file."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="run a staged search declared in a plan file (sm -> md -> lg, then the final model)",
        description="A plan file declares the data, the study database and the stages of a staged "
        "search (see conf/plans/). 'run' runs each stage's study to its budget on this machine and "
        "then trains and evaluates the final stage's best config; rerunning continues where it "
        "stopped. 'submit' does the same as chained Slurm jobs. 'status' shows every stage.",
    )
    p.add_argument("plan", metavar="PLAN_INI")
    actions = p.add_subparsers(dest="plan_command", metavar="ACTION", required=True)
    r = actions.add_parser("run", help="run the stages in order, then the final step")
    r.add_argument("--workers", type=int, metavar="N", help="local workers per stage (default: the plan's, else 1)")
    r.add_argument("--gpus", metavar="IDS", help="comma-separated GPU ids for the workers, as for optim run")
    r.add_argument("--force", action="store_true", help="accept changed stage settings that keep trials valid")
    s = actions.add_parser("status", help="one table of all stages")
    s.add_argument("--json", action="store_true", help="print the table as JSON")
    from stagetune.cli.optim_tools import add_plan_report_parser

    add_plan_report_parser(actions)
    _add_submit_parser(actions)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError
    from stagetune.plan.spec import read_plan

    from stagetune.packaged import resolve

    plan = read_plan(resolve(args.plan, "plan"))  # PLAN_INI or @plans/NAME
    if args.plan_command == "status":
        return _status(plan, args.json)
    if args.plan_command == "submit":
        return _submit(plan, args)
    if args.plan_command == "report":
        from stagetune.cli.optim_tools import plan_report

        return plan_report(plan, args)
    if args.plan_command == "job":
        return _job(plan, args)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.gpus is not None:
        # optim run --gpus's own checks, before any stage starts (each stage's optim run
        # warns when its workers share GPUs or leave some idle)
        from stagetune.cli.optim import check_gpus_visible, gpu_ids

        gpu_ids(args.gpus)
        check_gpus_visible(args.gpus)
    from stagetune.plan.runner import run_plan

    return run_plan(plan, workers=args.workers, gpus=args.gpus, force=args.force,
                    say=lambda line: print(line, flush=True))


def _status(plan: Any, as_json: bool) -> int:
    from stagetune.plan.status import plan_status

    table = plan_status(plan)
    if as_json:
        print(json.dumps(table, default=str))
        return 0
    rows = [("stage", "from", "state", "trials", "best value", "best trial", "top parameters")]
    for st in table["stages"]:
        rows.append((st["stage"], st["from"] or "-", st["state"], f"{st['finished']}/{st['budget']}",
                     "-" if st["best_value"] is None else f"{st['best_value']:.4g}",
                     "-" if st["best_trial"] is None else str(st["best_trial"]),
                     ", ".join(st["top_parameters"]) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    final = table["final"]
    if final is not None:
        print(f"final ({final['stage']}): {final['state']}" + (f": {final['model']}" if final.get("model") else "")
              + (f", test error {final['test_error']:.2%}" if final.get("test_error") is not None else ""))
    sys.stdout.flush()
    return 0


def _add_submit_parser(actions: argparse._SubParsersAction) -> None:
    sb = actions.add_parser(
        "submit", help="submit the stages and the final step to Slurm as dependent jobs",
        description="Per stage an init job, then an array of workers (one per task, --array=0-(N-1)); "
        "the next stage's init job waits for the array (afterany) and fails unless the stage met its "
        "budget, which stops the jobs after it; the final step (best, train, evaluate) is a job after the last "
        "stage. Workers get --requeue --signal=B:USR1@120: they hand their trial back before the time "
        "limit and requeue. Submitting again submits only what is left. Job scripts and logs: "
        "OUT_DIR/slurm/. The plan file's partition, gres, time and sbatch keys ([plan] for every job, "
        "a stage's for its jobs) give the sbatch options; the options below override them for every "
        "job (--sbatch-option adds to them). --gres goes only to the workers and the final job.",
    )
    sb.add_argument("--dry-run", action="store_true", help="print the submission as a shell script; submit nothing")
    sb.add_argument("--workers", type=int, metavar="N",
                    help="array tasks per stage (default: the stage's workers, else the plan's, else 1)")
    sb.add_argument("--partition", metavar="NAME", help="sbatch --partition of every job")
    sb.add_argument("--gres", metavar="SPEC", help="sbatch --gres of the workers and the final job, e.g. gpu:1")
    sb.add_argument("--time", metavar="LIMIT", help="sbatch --time of every job, e.g. 4:00:00")
    sb.add_argument(
        "--sbatch-option", dest="sbatch_options", action="append", default=[], metavar="OPTION",
        help="pass OPTION to every sbatch call (repeatable; write --sbatch-option=--mem=8G)",
    )
    sb.add_argument("--force", action="store_true", help="accept changed stage settings that keep trials valid")
    # What the submitted jobs run (not listed: no help=): one init, or the final step.
    job = actions.add_parser("job", description="One job of a submitted plan (plan submit writes the calls).")
    job.add_argument("step", choices=("init", "final"))
    job.add_argument("stage", nargs="?", metavar="STAGE", help="the stage to initialise")
    job.add_argument("--after", metavar="STAGE", help="fail (exit 1) unless this stage has met its budget")
    job.add_argument("--force", action="store_true", help="accept changed stage settings that keep trials valid")


def _submit(plan: Any, args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError
    from stagetune.plan.slurm import SlurmOptions, submit_plan
    from stagetune.plan.slurm_keys import check_gres, check_partition, check_time, split_sbatch

    given = {}
    for key, flag, check in (("partition", "--partition", check_partition), ("gres", "--gres", check_gres),
                             ("time", "--time", check_time), ("sbatch_options", "--sbatch-option", split_sbatch)):
        value = getattr(args, key)
        try:
            given[key] = None if value is None else check(value)
        except ValueError as exc:
            shown = " ".join(value) if isinstance(value, list) else value
            raise UsageError(f"{flag} {shown!r}: {exc}") from None
    options = SlurmOptions(partition=given["partition"], gres=given["gres"], time=given["time"],
                           extra=given["sbatch_options"], workers=args.workers)
    return submit_plan(plan, options, dry_run=args.dry_run, force=args.force,
                       say=lambda line: print(line, flush=True))


def _job(plan: Any, args: argparse.Namespace) -> int:
    from stagetune.plan.slurm import run_job

    return run_job(plan, args.step, args.stage, after=args.after, force=args.force,
                   say=lambda line: print(line, flush=True))
