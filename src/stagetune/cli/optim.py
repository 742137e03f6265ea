"""``stagetune optim [--study-name NAME] DB_URL {init,run,important,best,status}``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from stagetune.cli._common import (
    add_threads_argument,
    check_output_file,
    non_negative_int,
    positive_float,
    positive_int,
    set_threads,
    write_output_file,
)
from stagetune.optim.metrics import DEFAULT_METRIC, METRICS

__all__ = ["add_parser", "run"]

_FORMATS = ("ini", "json", "yaml")


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optim",
        help="hyperparameter search studies in SQL (init, run, important, best, status)",
        description="Studies live in a SQL database (SQLite file, PostgreSQL or MySQL/MariaDB). "
        "Many workers may run on one study at once.",
    )
    p.add_argument("--study-name", default=None, help="default: the database name (as cnn-mellin)")
    p.add_argument("url", metavar="DB_URL", help="e.g. sqlite:///exp/optim.db, postgresql://user@host/db")
    cmds = p.add_subparsers(dest="optim_command", metavar="{init,run,important,best,status}")

    init = cmds.add_parser("init", help="create a study from the base config and a data dir")
    init.add_argument("train_dir", metavar="TRAIN_DIR", nargs="?", help="Kaldi training data dir")
    dev = init.add_mutually_exclusive_group()
    dev.add_argument("--dev-dir", metavar="DIR", help="separate dev data dir")
    dev.add_argument("--dev-proportion", type=float, metavar="P", help="hold out this proportion of TRAIN_DIR (default 0.1)")
    init.add_argument("--whitelist", nargs="+", default=[], metavar="REGEX", help="tune only names fully matching one of these")
    init.add_argument("--blacklist", nargs="+", default=[], metavar="REGEX", help="never tune names fully matching these")
    init.add_argument("--mem-limit-bytes", type=int, default=None, metavar="N", help="prune trials whose training step needs more")
    init.add_argument("--num-trials", type=int, default=None, metavar="N", help="finished (complete + pruned) trials to run in all")
    init.add_argument("--pruner", default="hyperband", help="hyperband, median, successive-halving or none")
    init.add_argument(
        "--metric",
        default=None,
        help=f"what a trial's value is, per epoch and at its best epoch: {', '.join(sorted(METRICS))} "
        f"(dev error rate; dev loss per token or frame; the error with the loss as tie-breaker); "
        f"default {DEFAULT_METRIC}, or PREV's with --from-study",
    )
    init.add_argument("--num-data-workers", type=non_negative_int, default=0, metavar="N")
    init.add_argument("--force", action="store_true", help="replace settings that do not invalidate trials")
    init.add_argument(
        "--enqueue-base", action="store_true",
        help="a new study's first trial is the base config (with --from-study: PREV's best)",
    )
    init.add_argument("--from-study", metavar="PREV", help="chain: whitelist from PREV's importance, base config from PREV's best")
    init.add_argument("--top-k", type=int, default=None, metavar="K", help="with --from-study: the K most important parameters")
    init.add_argument("--threshold", type=float, default=None, metavar="T", help="with --from-study: parameters with importance >= T")
    init.add_argument("--independent", action="store_true", help="with --from-study: each value by lowest median error")
    init.add_argument("--evaluator", default="ped-anova", help="with --from-study: importance evaluator")
    init.add_argument("--set", dest="init_set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="edit the base config")

    run_p = cmds.add_parser("run", help="a worker: pull trials, train, report, prune")
    run_p.add_argument("--sampler", default="tpe", help="tpe (default), random, gp, cmaes, nsgaii or qmc")
    run_p.add_argument("--n-trials", type=int, default=None, metavar="N", help="at most N trials in this worker")
    run_p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS", help="start no trial after this long")
    run_p.add_argument("--ckpt-dir", default="stagetune-ckpt", metavar="DIR", help="trial checkpoints (shared by all workers)")
    run_p.add_argument("--max-retries", type=int, default=3, metavar="N", help="retries of a trial whose worker died")
    run_p.add_argument("--seed", type=int, default=None, help="sampler seed")
    run_p.add_argument("--heartbeat-interval", type=positive_int, default=30, metavar="SECONDS")
    run_p.add_argument("--grace-period", type=positive_int, default=None, metavar="SECONDS", help="stale after this (default 2x interval)")
    run_p.add_argument("--num-data-workers", type=non_negative_int, default=None, metavar="N", help="override the study's DataLoader workers")
    run_p.add_argument("--keep-models", action="store_true", help="keep every trial's model dir")
    run_p.add_argument("--objective", default="train", help="train (default); quadratic or sleep for benchmarks")
    run_p.add_argument("--sleep-seconds", type=float, default=1.0, help="for --objective sleep")
    run_p.add_argument("--verbose", action="store_true", help="a line per epoch too")
    run_p.add_argument("--workers", type=int, default=1, metavar="N", help="run N local worker processes")
    run_p.add_argument("--gpus", default=None, metavar="IDS", help="with --workers: comma-separated GPU ids, one per worker")
    add_threads_argument(run_p, per_worker=True)

    imp = cmds.add_parser("important", help="rank parameters by importance; one dotted name per line")
    imp.add_argument("out", metavar="OUT", nargs="?", default="-", help="file or - for stdout")
    group = imp.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, default=None, metavar="K")
    group.add_argument("--threshold", type=float, default=None, metavar="T")
    imp.add_argument("--evaluator", default="ped-anova", help="ped-anova (default), fanova or mdi")
    imp.add_argument("--seed", type=int, default=0, help="evaluator seed (fixed: same study, same ranking)")
    imp.add_argument("--verbose", action="store_true", help="print importances to stderr")

    best = cmds.add_parser("best", help="write the best trial's full config")
    best.add_argument("out", metavar="OUT", nargs="?", default="-", help="file (.ini, .json, .yaml) or - for stdout")
    best.add_argument("--format", choices=_FORMATS, default=None, help="default: by extension, else ini")
    best.add_argument("--independent", action="store_true", help="each value by lowest median error (cnn-mellin)")
    best.add_argument("--set", dest="best_set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="edit the output")

    status = cmds.add_parser("status", help="trials by state, budget, best, running trials")
    status.add_argument("--json", action="store_true")
    status.add_argument("--check", action="store_true", help="exit 0 only when the budget is met")
    p.set_defaults(func=run)


def _write_output(out: str, text: str) -> None:
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_output_file(Path(out), text)


def run(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError

    if not args.optim_command:
        raise UsageError("optim needs a command: init, run, important, best or status")
    from stagetune.optim.storage import default_study_name, warn_inline_password

    warning = warn_inline_password(args.url)
    if warning:
        _err(f"stagetune: warning: {warning}")
    study_name = args.study_name or default_study_name(args.url)
    return _COMMANDS[args.optim_command](args, study_name)


def _init(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.config import apply_overrides, load_config
    from stagetune.errors import UsageError
    from stagetune.optim.storage import mask_url, storage_session
    from stagetune.optim.study import init_study, load_study

    chain = (args.top_k, args.threshold, args.independent)
    if args.from_study is None and any(v not in (None, False) for v in chain):
        raise UsageError("--top-k, --threshold and --independent of init go with --from-study")
    if args.from_study is not None and args.read_ini:
        raise UsageError("--from-study takes the base config from the previous study's best; drop --read-ini")
    if args.from_study is not None and args.whitelist:
        raise UsageError("--from-study takes the whitelist from the previous study's importance; drop --whitelist")
    spec = None
    if args.from_study is None:
        if args.train_dir is None:
            raise UsageError("init needs TRAIN_DIR (or --from-study to reuse a previous study's data)")
        # Arguments and data are checked before the database is opened: a mistake
        # leaves no new, empty database file behind.
        config = load_config(args.read_ini, args.overrides + args.init_set)
        spec = _init_spec(
            args, config, args.train_dir, args.dev_dir, args.dev_proportion,
            args.whitelist, None, args.metric or DEFAULT_METRIC,
        )
    # --from-study reads PREV from the database, which must exist already.
    with storage_session(args.url, create=args.from_study is None) as storage:
        if spec is None:
            from stagetune.optim.analysis import (
                best_config,
                completed_in_memory,
                rank_parameters,
                select_important,
            )

            prev, prev_spec = load_study(storage, args.from_study, args.url)
            # The same ranking `optim important` prints for PREV.
            ranking = rank_parameters(completed_in_memory(storage, prev), evaluator=args.evaluator)
            whitelist = [
                re.escape(name)
                for name in select_important(ranking, top_k=args.top_k, threshold=args.threshold)
            ]
            config, repairs = best_config(prev, prev_spec, independent=args.independent)
            for name, change in repairs.items():
                _err(f"repaired {name}: {change}")
            config = apply_overrides(config, args.overrides + args.init_set)
            metric = args.metric or prev_spec.metric
            train_dir = args.train_dir or prev_spec.train_dir
            dev_dir = args.dev_dir if args.train_dir else (args.dev_dir or prev_spec.dev_dir)
            dev_prop = args.dev_proportion if args.train_dir or args.dev_dir else prev_spec.dev_proportion
            spec = _init_spec(args, config, train_dir, dev_dir, dev_prop, whitelist, args.from_study, metric)
        result = init_study(
            storage, study_name, args.url, spec, force=args.force,
            enqueue_base=args.enqueue_base, log=_err,
        )
    where = mask_url(args.url)
    budget = f"{spec.num_trials} trials" if spec.num_trials else "no trial budget"
    if result.action == "unchanged":
        print(f"study {study_name} in {where} already exists with these settings; nothing to do")
    else:
        count = f"{len(spec.tuned)} parameter{'' if len(spec.tuned) == 1 else 's'}"
        print(
            f"{result.action} study {study_name} in {where}: tuning {count} ({', '.join(spec.tuned)}); "
            f"{budget}; metric {spec.metric}"
        )
    return 0


def _init_spec(
    args: argparse.Namespace,
    config: Any,
    train_dir: str,
    dev_dir: str | None,
    dev_proportion: float | None,
    whitelist: list[str],
    parent_study: str | None,
    metric: str,
) -> Any:
    """The validated study spec of ``optim init`` (reads the data; writes nothing)."""
    from stagetune.optim.study import build_spec

    return build_spec(
        config,
        train_dir,
        dev_dir=dev_dir,
        dev_proportion=dev_proportion if dev_dir is None else None,
        whitelist=whitelist,
        blacklist=args.blacklist,
        mem_limit_bytes=args.mem_limit_bytes,
        num_trials=args.num_trials,
        pruner=args.pruner,
        device=args.device,
        num_data_workers=args.num_data_workers,
        parent_study=parent_study,
        metric=metric,
    )


def _run(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.errors import UsageError
    from stagetune.optim.objective import OBJECTIVES
    from stagetune.optim.registry import SAMPLERS
    from stagetune.optim.worker import WorkerOptions, run_worker

    if args.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {args.sampler!r}: choose one of {', '.join(sorted(SAMPLERS))}")
    if args.objective not in OBJECTIVES:
        raise UsageError(f"--objective {args.objective!r}: choose one of {', '.join(sorted(OBJECTIVES))}")
    for flag, value in (("--n-trials", args.n_trials), ("--max-retries", args.max_retries)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1 or args.gpus:
        return _run_pool(args, study_name)
    if args.objective == "train":  # quadratic and sleep workers never import torch
        set_threads(args.threads or 1)
    options = WorkerOptions(
        sampler=args.sampler,
        n_trials=args.n_trials,
        timeout=args.timeout,
        ckpt_dir=Path(args.ckpt_dir),
        max_retries=args.max_retries,
        seed=args.seed,
        objective=args.objective,
        heartbeat_interval=args.heartbeat_interval,
        grace_period=args.grace_period,
        device=args.device,
        num_data_workers=args.num_data_workers,
        keep_models=args.keep_models,
        sleep_seconds=args.sleep_seconds,
        verbose=args.verbose,
    )
    summary = run_worker(args.url, study_name, options, log=_err)
    _err(summary.line())
    return 0


def _run_pool(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.optim.pool import run_pool
    from stagetune.optim.storage import driver_modules, storage_session
    from stagetune.optim.study import load_study

    worker = [*(["--device", args.device] if args.device else []), "optim", "--study-name", study_name, args.url, "run"]
    for flag, value in (
        ("--sampler", args.sampler),
        ("--n-trials", args.n_trials),
        ("--timeout", args.timeout),
        ("--ckpt-dir", args.ckpt_dir),
        ("--max-retries", args.max_retries),
        ("--heartbeat-interval", args.heartbeat_interval),
        ("--grace-period", args.grace_period),
        ("--num-data-workers", args.num_data_workers),
        ("--objective", args.objective),
        ("--sleep-seconds", args.sleep_seconds),
        ("--threads", args.threads),
    ):
        if value is not None:
            worker += [flag, str(value)]
    worker += ["--keep-models"] if args.keep_models else []
    worker += ["--verbose"] if args.verbose else []
    gpus = [g for g in (args.gpus or "").split(",") if g.strip()]
    # Imported once in the pool, shared by the forked workers (they never import more).
    preload = ["stagetune.optim.worker", *driver_modules(args.url)]
    if args.objective == "train":
        preload += ["torch", "stagetune.training", "stagetune.optim.memory", "stagetune.corpus"]
    from stagetune.cli import main

    # One clear error for a missing study or unreachable database, not one per worker.
    # The connections are closed again before forking: every worker opens its own.
    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        load_study(storage, study_name, args.url)
    return run_pool(worker, args.workers, main=main, gpus=gpus, seed=args.seed, preload=preload, out=_err)


def _important(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.optim.analysis import rank_parameters, select_important
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    if args.evaluator == "ped-anova" and "sklearn" not in sys.modules:
        # PED-ANOVA needs no scikit-learn, but importing optuna.importance would
        # load it (seconds) for fANOVA's sake; keep `important` fast.
        sys.modules["sklearn"] = None  # type: ignore[assignment]
    from stagetune.optim.analysis import completed_in_memory

    if args.out != "-":
        check_output_file(args.out, "OUT", "important.txt")
    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        study, _ = load_study(storage, study_name, args.url)
        ranking = rank_parameters(completed_in_memory(storage, study), evaluator=args.evaluator, seed=args.seed)
    chosen = select_important(ranking, top_k=args.top_k, threshold=args.threshold)
    if args.verbose:
        for name, value in ranking:
            _err(f"{value:.4f} {name}")
    _write_output(args.out, "".join(f"{n}\n" for n in chosen))
    return 0


def _best(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.config import to_dict, write_ini
    from stagetune.optim.analysis import best_config, describe_best
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    if args.out != "-":
        check_output_file(args.out, "OUT", "best.ini")
    fmt = args.format
    if fmt is None:
        suffix = Path(args.out).suffix.lower().lstrip(".") if args.out != "-" else ""
        fmt = {"json": "json", "yaml": "yaml", "yml": "yaml"}.get(suffix, "ini")
    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        study, spec = load_study(storage, study_name, args.url)
        config, repairs = best_config(
            study, spec, independent=args.independent, overrides=args.overrides + args.best_set
        )
        if args.independent:
            _err(f"each value by its lowest median value (metric {spec.metric})")
        else:
            _err(describe_best(study.best_trial, spec))
    for name, change in repairs.items():
        _err(f"repaired {name}: {change}")
    if fmt == "ini":
        text = write_ini(config)
    elif fmt == "json":
        text = json.dumps(to_dict(config), indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(to_dict(config), sort_keys=False)
    _write_output(args.out, text)
    return 0


def _status(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.optim.status import format_status, study_status
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        study, spec = load_study(storage, study_name, args.url)
        status = study_status(study, spec, storage)
    if args.json:
        print(json.dumps(status, default=str))
    else:
        sys.stdout.write(format_status(status))
    if args.check and not status["budget_met"]:
        return 1
    return 0


_COMMANDS: dict[str, Any] = {
    "init": _init,
    "run": _run,
    "important": _important,
    "best": _best,
    "status": _status,
}
