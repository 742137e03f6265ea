"""``stagetune optim [--study-name NAME] DB_URL {init,run,important,best,status}``."""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import unicodedata
from pathlib import Path
from typing import Any

from stagetune.cli._common import (
    add_global_options,
    add_threads_argument,
    check_output_file,
    non_negative_int,
    positive_float,
    positive_int,
    set_threads,
    write_output_file,
)
from stagetune.optim.metrics import DEFAULT_METRIC, METRICS

__all__ = ["add_parser", "run", "gpu_ids", "check_gpus_visible"]

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
    cmds = p.add_subparsers(dest="optim_command", metavar="{init,run,important,best,status,report,list,delete,dashboard}")

    init = cmds.add_parser("init", help="create a study from the base config and a data dir")
    init.add_argument("train_dir", metavar="TRAIN_DIR", nargs="?", help="Kaldi training data dir")
    dev = init.add_mutually_exclusive_group()
    dev.add_argument("--dev-dir", metavar="DIR", help="separate dev data dir")
    dev.add_argument("--dev-proportion", type=float, metavar="P", help="hold out this proportion of TRAIN_DIR (default 0.1)")
    init.add_argument("--whitelist", nargs="+", default=[], metavar="REGEX", help="tune only names fully matching one of these")
    init.add_argument("--blacklist", nargs="+", default=[], metavar="REGEX", help="never tune names fully matching these")
    init.add_argument("--mem-limit-bytes", type=int, default=None, metavar="N", help="prune trials whose training step needs more")
    init.add_argument(
        "--time-limit", type=positive_float, default=None, metavar="SECONDS",
        help="prune trials whose training is projected (from one timed step) to take longer",
    )
    init.add_argument("--num-trials", type=int, default=None, metavar="N", help="finished (complete + pruned) trials to run in all")
    init.add_argument(
        "--pruner", default=None,
        help="hyperband (default), median, successive-halving or none; with --from-study default PREV's",
    )
    init.add_argument(
        "--sampler", default=None,
        help="what `optim run` samples with unless given its own --sampler: tpe (default), random, gp, "
        "cmaes, nsgaii or qmc; with --from-study default PREV's",
    )
    init.add_argument(
        "--metric",
        default=None,
        help=f"what a trial's value is, per epoch and at its best epoch: {', '.join(sorted(METRICS))} "
        f"(dev error rate; dev loss per token or frame; the error with the loss as tie-breaker); "
        f"default {DEFAULT_METRIC}, or PREV's with --from-study",
    )
    init.add_argument(
        "--num-data-workers", type=non_negative_int, default=None, metavar="N",
        help="DataLoader workers per trial (default 0; with --from-study PREV's)",
    )
    adapt = init.add_mutually_exclusive_group()
    adapt.add_argument(
        "--adapt-from", metavar="BASE_PT", default=None,
        help="every trial adapts this base model.pt (as `train --adapt-from`; checked now, its path and hash "
        "stored in the study) and training.adapt_rho is tuned; with --from-study default PREV's base",
    )
    adapt.add_argument(
        "--no-adapt-from", action="store_true", help="with --from-study: train from scratch although PREV adapted a base",
    )
    init.add_argument("--force", action="store_true", help="replace settings that do not invalidate trials")
    init.add_argument(
        "--enqueue-base", action="store_true",
        help="a new study's first trial is the base config (with --from-study: PREV's best)",
    )
    init.add_argument(
        "--from-study", metavar="PREV",
        help="chain: base config from PREV's best (--read-ini and --set apply over it), tune PREV's most "
        "important parameters (or what --whitelist/--blacklist select); unset settings are PREV's",
    )
    init.add_argument("--top-k", type=int, default=None, metavar="K", help="with --from-study: the K most important parameters")
    init.add_argument("--threshold", type=float, default=None, metavar="T", help="with --from-study: parameters with importance >= T")
    init.add_argument("--independent", action="store_true", help="with --from-study: each value by lowest median error")
    init.add_argument("--evaluator", default="ped-anova", help="with --from-study: importance evaluator")
    init.add_argument(
        "--narrow", type=float, default=None, metavar="Q",
        help="with --from-study: numeric ranges narrow to the bounding box of PREV's best Q of completed trials "
        "(0 < Q <= 1; at least 2 trials, and those of --enqueue-best); categorical ones stay",
    )
    init.add_argument(
        "--around-base", type=float, default=None, metavar="W",
        help="numeric ranges shrink to a window of W of their width (of its log, for log ranges) around the "
        "base config's values (0 < W <= 1): a local search from a config known to work; categorical ones stay",
    )
    init.add_argument(
        "--enqueue-best", type=positive_int, default=None, metavar="N",
        help="with --from-study: a new study's first trials are PREV's N best (their values of the tuned "
        "parameters, each once; after the base with --enqueue-base)",
    )
    init.add_argument("--set", dest="init_set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="edit the base config")

    run_p = cmds.add_parser(
        "run", help="a worker: pull trials, train, report, prune",
        description="Pull trials until the study's budget, --n-trials or --timeout is reached (exit 0). "
        "SIGINT/SIGTERM hand the running trial back for retry and exit 130/143, so `run && next` stops.",
    )
    run_p.add_argument(
        "--sampler", default=None,
        help="tpe, random, gp, cmaes, nsgaii or qmc; default: the study's (optim init --sampler, else tpe)",
    )
    run_p.add_argument("--n-trials", type=int, default=None, metavar="N", help="at most N trials in this worker")
    run_p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS", help="start no trial after this long")
    run_p.add_argument("--ckpt-dir", default="stagetune-ckpt", metavar="DIR", help="trial checkpoints (shared by all workers)")
    run_p.add_argument("--max-retries", type=int, default=3, metavar="N", help="retries of a trial whose worker died")
    run_p.add_argument("--seed", type=int, default=None, help="sampler seed")
    run_p.add_argument(
        "--heartbeat-interval", type=positive_int, default=None, metavar="SECONDS",
        help="the study's rule if it has one (set by its first worker), else this (default 30); "
        "a different value is ignored with a warning",
    )
    run_p.add_argument("--grace-period", type=positive_int, default=None, metavar="SECONDS", help="stale after this (default 2x interval; as --heartbeat-interval)")
    run_p.add_argument("--num-data-workers", type=non_negative_int, default=None, metavar="N", help="override the study's DataLoader workers")
    run_p.add_argument("--keep-models", action="store_true", help="keep every trial's model dir (default: the best trial's only, for optim best --model)")
    run_p.add_argument("--objective", default="train", help="train (default); quadratic or sleep for benchmarks")
    run_p.add_argument("--sleep-seconds", type=float, default=1.0, help="for --objective sleep")
    run_p.add_argument("--verbose", action="store_true", help="(the default now: a line per epoch)")
    run_p.add_argument("--quiet", action="store_true", help="no line per epoch, only a line per trial")
    run_p.add_argument(
        "--tensorboard", default=None, metavar="DIR",
        help="per-epoch scalars of each trial in DIR/STUDY/trial-N, its parameters as hparams (extra: tensorboard)",
    )
    run_p.add_argument("--workers", type=int, default=1, metavar="N", help="run N local worker processes")
    run_p.add_argument(
        "--gpus", default=None, metavar="IDS",
        help="with --workers: comma-separated GPU ids, one per worker (fewer: workers share them)",
    )
    add_threads_argument(run_p, per_worker=True)

    imp = cmds.add_parser("important", help="rank parameters by importance; one dotted name per line")
    imp.add_argument("out", metavar="OUT", nargs="?", default="-", help="file or - for stdout")
    group = imp.add_mutually_exclusive_group()
    group.add_argument("--top-k", type=int, default=None, metavar="K")
    group.add_argument("--threshold", type=float, default=None, metavar="T")
    imp.add_argument("--evaluator", default="ped-anova", help="ped-anova (default), fanova or mdi")
    imp.add_argument("--seed", type=int, default=0, help="evaluator seed (fixed: same study, same ranking)")
    imp.add_argument(
        "--max-trials", type=int, default=None, metavar="N",
        help="rank a random sample of N completed trials when there are more (drawn by --seed; "
        "default 1000, 0: all; said on stderr)",
    )
    imp.add_argument("--verbose", action="store_true", help="print importances to stderr")

    best = cmds.add_parser("best", help="write the best trial's full config")
    best.add_argument("out", metavar="OUT", nargs="?", default=None, help="file (.ini, .json, .yaml) or - for stdout (the default without --model)")
    best.add_argument("--model", metavar="OUT_PT", default=None, help="also export the best trial's kept model.pt (for stagetune evaluate)")
    best.add_argument("--ckpt-dir", default="stagetune-ckpt", metavar="DIR", help="with --model: the workers' --ckpt-dir")
    best.add_argument("--format", choices=_FORMATS, default=None, help="default: by extension, else ini")
    best.add_argument("--independent", action="store_true", help="each value by lowest median error (cnn-mellin)")
    best.add_argument("--set", dest="best_set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="edit the output")

    status = cmds.add_parser("status", help="trials by state, budget, best, running trials")
    status.add_argument("--json", action="store_true")
    status.add_argument("--check", action="store_true", help="exit 0 only when the budget is met")
    status.add_argument(
        "--watch", type=positive_float, default=None, metavar="SECONDS",
        help="show it again every SECONDS until the budget is met (Ctrl-C stops; --json: a line each time)",
    )
    from stagetune.cli import optim_tools

    tools = [(tool, ()) for tool in optim_tools.add_parsers(cmds)]
    for parser, own in ((init, ("--set",)), (run_p, ()), (imp, ()), (best, ("--set",)), (status, ()), *tools):
        add_global_options(parser, after_command=True, skip=own)
    p.set_defaults(func=run)


def _write_output(out: str, text: str) -> None:
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_output_file(Path(out), text)


#: Read-only commands that end the process (``status`` without ``--watch``): no cyclic
#: garbage collection (see :func:`run`).
_SHORT_READS = frozenset({"important", "best", "status"})


def run(args: argparse.Namespace) -> int:
    from stagetune.errors import UsageError

    if not args.optim_command:
        raise UsageError("optim needs a command: init, run, important, best, status, report, list, delete or dashboard")
    # Before the imports: usage errors are instant.
    if args.study_name is not None:
        _check_study_name(args.study_name, "--study-name")
    if getattr(args, "from_study", None) is not None:
        _check_study_name(args.from_study, "--from-study")
    if args.optim_command in _SHORT_READS and getattr(args, "watch", None) is None:
        # The process ends with the command.  The cyclic collector's passes over the
        # objects SQLAlchemy's and optuna's imports create (and a 1000-trial sample's)
        # cost about 0.15 s of a 2-s command and free nothing that exit would not.
        gc.disable()
    if args.optim_command == "run" and args.gpus is not None:
        gpu_ids(args.gpus)
        if args.objective == "train":  # the benchmark objectives never touch a GPU
            _check_gpus_device(args.gpus, args.device)
    from stagetune.optim.storage import default_study_name, warn_inline_password

    warning = warn_inline_password(args.url)
    if warning:
        _err(f"stagetune: warning: {warning}")
    study_name = args.study_name
    if study_name is None:
        study_name = default_study_name(args.url)
        _check_study_name(study_name, "--study-name (by default the database name)")
    return {**_COMMANDS, **_tools()}[args.optim_command](args, study_name)


def _check_study_name(name: str, what: str) -> None:
    """A study name is also a directory name (its trials' checkpoints): refuse what is no plain name.

    Raises:
        UsageError: ``name`` is empty, ``.`` or ``..``, or holds a path separator
            or a control character.
    """
    from stagetune.errors import UsageError

    if not name:
        hint = "; name the study, or leave --study-name out to use the database name" if what == "--study-name" else ""
        raise UsageError(f"{what} is empty{hint}")
    problem = None
    if name in (".", ".."):
        problem = "is not a name"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        problem = "holds a control character"
    if problem is not None:
        raise UsageError(
            f"{what} {name!r} {problem}; a study name also names its checkpoint directory, "
            f"so use letters, digits and -_. (e.g. {_plain_name(name)!r})"
        )


def _plain_name(name: str) -> str:
    """A suggestion for a study name that :func:`_check_study_name` refused."""
    plain = re.sub(r"(?:[^\w.-]|\.\.)+", "-", name).strip("-.")
    return plain or "stage1"


def _init(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.config import apply_overrides, load_config, read_ini
    from stagetune.errors import UsageError
    from stagetune.optim.storage import mask_url, storage_session
    from stagetune.optim.study import init_study, load_study

    chain = {
        "--top-k": args.top_k, "--threshold": args.threshold, "--independent": args.independent or None,
        "--narrow": args.narrow, "--enqueue-best": args.enqueue_best,
    }
    given = [flag for flag, value in chain.items() if value is not None]
    if args.from_study is None and given:
        raise UsageError(
            f"--top-k, --threshold, --independent, --narrow and --enqueue-best of init go with --from-study; "
            f"got {' '.join(given)} without it"
        )
    ranked = args.top_k is not None or args.threshold is not None
    if args.whitelist and ranked:
        raise UsageError(
            "--whitelist names what to tune, --top-k/--threshold take PREV's most important parameters: "
            "give one or the other (--blacklist goes with both)"
        )
    if args.narrow is not None and not 0 < args.narrow <= 1:
        raise UsageError(f"--narrow must be in (0, 1], got {args.narrow:g}; e.g. 0.25 for PREV's best quarter")
    if args.around_base is not None and not 0 < args.around_base <= 1:
        raise UsageError(
            f"--around-base must be in (0, 1], got {args.around_base:g}; e.g. 0.25 for a quarter of each range"
        )
    spec = None
    points: list[dict[str, Any]] = []
    if args.from_study is None:
        if args.train_dir is None:
            raise UsageError("init needs TRAIN_DIR (or --from-study to reuse a previous study's data)")
        # Arguments and data are checked before the database is opened: a mistake
        # leaves no new, empty database file behind.
        config = load_config(args.read_ini, args.overrides + args.init_set)
        spec = _init_spec(args, config, args.train_dir, args.dev_dir, args.dev_proportion, args.whitelist)
    # --from-study reads PREV from the database, which must exist already.
    with storage_session(args.url, create=args.from_study is None) as storage:
        if spec is None:
            import dataclasses

            from stagetune.optim.analysis import (
                IMPORTANCE_MAX_TRIALS,
                best_config,
                best_points,
                completed_in_memory,
                narrow_ranges,
                rank_parameters,
                select_important,
            )
            from stagetune.optim.sampling import drop_matching

            prev, prev_spec = load_study(storage, args.from_study, args.url)
            completed = completed_in_memory(storage, prev)
            if ranked or not (args.whitelist or args.blacklist):
                # The same ranking `optim important` prints for PREV (its default sample of at
                # most IMPORTANCE_MAX_TRIALS completed trials, seed 0), less the blacklisted names.
                ranked_on = completed
                if len(completed.trials) > IMPORTANCE_MAX_TRIALS:
                    ranked_on = completed_in_memory(storage, prev, max_trials=IMPORTANCE_MAX_TRIALS, seed=0)
                ranking = rank_parameters(ranked_on, evaluator=args.evaluator, seed=0)
                kept = drop_matching([n for n, _ in ranking], args.blacklist, "--blacklist")
                if not kept:
                    raise UsageError(
                        f"--blacklist leaves none of the parameters ranked in study {args.from_study!r} "
                        f"({', '.join(n for n, _ in ranking)}); give a --whitelist instead"
                    )
                chosen = select_important(
                    [(n, v) for n, v in ranking if n in kept], top_k=args.top_k, threshold=args.threshold
                )
                whitelist = [re.escape(name) for name in chosen]
            else:  # what the lists select, as a study of its own would
                whitelist = args.whitelist
            config, repairs = best_config(prev, prev_spec, independent=args.independent)
            for name, change in repairs.items():
                _err(f"repaired {name}: {change}")
            for path in args.read_ini:  # over PREV's best, as over the defaults without --from-study
                config = read_ini(path, config)
            config = apply_overrides(config, args.overrides + args.init_set)
            train_dir = args.train_dir or prev_spec.train_dir
            dev_dir = args.dev_dir if args.train_dir else (args.dev_dir or prev_spec.dev_dir)
            dev_prop = args.dev_proportion if args.train_dir or args.dev_dir else prev_spec.dev_proportion
            spec = _init_spec(
                args, config, train_dir, dev_dir, dev_prop, whitelist, parent=(args.from_study, prev_spec)
            )
            # PREV's own narrowed ranges carry over (its trials lie inside them); --narrow narrows further.
            inherited = {n: r for n, r in prev_spec.ranges.items() if n in spec.tuned}
            if args.narrow is not None:
                # PREV's trials queued by --enqueue-best lie inside the ranges (no sampler sees a
                # value outside its distribution).
                ranges, numbers = narrow_ranges(
                    completed, spec.tuned, args.narrow, at_least=args.enqueue_best or 2
                )
                for name, (low, high) in ranges.items():
                    _err(f"narrowed {name} to [{low:g}, {high:g}]")
                kept = {n: r for n, r in inherited.items() if n not in ranges}
                spec = dataclasses.replace(
                    spec,
                    ranges={**kept, **ranges},
                    narrowed_from={"study": args.from_study, "quantile": args.narrow, "trials": numbers,
                                   **({"inherited": prev_spec.narrowed_from} if kept else {})},
                )
            elif inherited:
                for name, (low, high) in inherited.items():
                    _err(f"kept {name} narrowed to [{low:g}, {high:g}], as in study {args.from_study!r}")
                spec = dataclasses.replace(spec, ranges=inherited, narrowed_from=prev_spec.narrowed_from)
            if args.enqueue_best is not None:
                points = best_points(completed, spec, args.enqueue_best)
        if args.around_base is not None:
            spec = _around_base(spec, args.around_base)
        result = init_study(
            storage, study_name, args.url, spec, force=args.force,
            enqueue_base=args.enqueue_base, enqueue=points, log=_err,
        )
    where = mask_url(args.url)
    budget = f"{spec.num_trials} trials" if spec.num_trials else "no trial budget"
    if result.action == "unchanged":
        print(f"study {study_name} in {where} already exists with these settings; nothing to do")
    else:
        count = f"{len(spec.tuned)} parameter{'' if len(spec.tuned) == 1 else 's'}"
        adapting = f"; adapting {spec.adapt_from['path']}" if spec.adapt_from else ""
        print(
            f"{result.action} study {study_name} in {where}: tuning {count} ({', '.join(spec.tuned)}); "
            f"{budget}; metric {spec.metric}{adapting}"
        )
    return 0


def _around_base(spec: Any, fraction: float) -> Any:
    """``spec`` with each tuned numeric range cut to a window around the base config's value.

    See :func:`~stagetune.optim.sampling.windows_around`; each cut range is logged.
    """
    import dataclasses

    from stagetune.config import flatten
    from stagetune.optim.sampling import windows_around

    values = flatten(spec.config())
    ranges = windows_around(values, spec.tuned, fraction, spec.ranges)
    for name, (low, high) in ranges.items():
        if spec.ranges.get(name) != [low, high]:
            _err(f"narrowed {name} to [{low:g}, {high:g}] around its base value {values[name]:g}")
    return dataclasses.replace(
        spec, ranges=ranges, narrowed_from={**(spec.narrowed_from or {}), "around_base": fraction}
    )


def _init_spec(
    args: argparse.Namespace,
    config: Any,
    train_dir: str,
    dev_dir: str | None,
    dev_proportion: float | None,
    whitelist: list[str],
    *,
    parent: tuple[str, Any] | None = None,
) -> Any:
    """The validated study spec of ``optim init`` (reads the data; writes nothing).

    A setting not given on the command line is the ``parent`` study's (name,
    spec), if any, else the default.
    """
    from stagetune.errors import UsageError
    from stagetune.optim.registry import SAMPLERS
    from stagetune.optim.spec import DEFAULT_SAMPLER
    from stagetune.optim.study import build_spec

    def setting(given: Any, inherited: str, default: Any) -> Any:
        if given is not None:
            return given
        return getattr(parent[1], inherited) if parent is not None else default

    sampler = setting(args.sampler, "sampler", None) or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        raise UsageError(f"--sampler {sampler!r}: choose one of {', '.join(sorted(SAMPLERS))}")
    from stagetune.extras import require_sampler

    require_sampler(sampler)  # its package missing: one line naming the extra, before the study exists
    inherited_base = parent[1].adapt_from if parent is not None and not args.no_adapt_from else None
    adapt_from = args.adapt_from or (inherited_base["path"] if inherited_base else None)
    spec = build_spec(
        config,
        train_dir,
        dev_dir=dev_dir,
        dev_proportion=dev_proportion if dev_dir is None else None,
        whitelist=whitelist,
        blacklist=args.blacklist,
        mem_limit_bytes=setting(args.mem_limit_bytes, "mem_limit_bytes", None),
        num_trials=args.num_trials,
        pruner=setting(args.pruner, "pruner", "hyperband"),
        device=setting(args.device, "device", None),
        num_data_workers=setting(args.num_data_workers, "num_data_workers", 0),
        parent_study=parent[0] if parent is not None else None,
        metric=setting(args.metric, "metric", DEFAULT_METRIC),
        adapt_from=adapt_from,
    )
    if args.adapt_from is None and inherited_base and spec.adapt_from["hash"] != inherited_base["hash"]:
        raise UsageError(
            f"study {parent[0]!r} adapts base model {inherited_base['path']} (hash {inherited_base['hash'][:8]}), "
            f"which has changed since (hash {spec.adapt_from['hash'][:8]}); give --adapt-from to adapt it as it "
            f"is now, or --no-adapt-from"
        )
    spec.sampler = sampler
    spec.time_limit_s = setting(args.time_limit, "time_limit_s", None)  # checked > 0 when parsed
    return spec


def _run(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.errors import UsageError
    from stagetune.optim.objective import OBJECTIVES
    from stagetune.optim.registry import SAMPLERS
    from stagetune.optim.worker import run_worker

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise UsageError(f"--sampler {args.sampler!r}: choose one of {', '.join(sorted(SAMPLERS))}")
    if args.sampler is not None:
        from stagetune.extras import require_sampler

        require_sampler(args.sampler)  # the study's own sampler: checked where it is made
    if args.objective not in OBJECTIVES:
        raise UsageError(f"--objective {args.objective!r}: choose one of {', '.join(sorted(OBJECTIVES))}")
    for flag, value in (("--n-trials", args.n_trials), ("--max-retries", args.max_retries)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0, got {value}")
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.tensorboard:
        from stagetune.optim.tensorboard import require_tensorboard

        require_tensorboard()
    if args.gpus is not None and args.objective == "train":
        check_gpus_visible(args.gpus)
    options = _worker_options(args)
    if args.workers > 1 or args.gpus:
        return _run_pool(args, study_name, options)
    if args.objective == "train":  # quadratic and sleep workers never import torch
        set_threads(args.threads or 1)
    summary = run_worker(args.url, study_name, options, log=_err)
    _err(summary.line())
    return summary.exit_code()  # 130/143 when interrupted: `run && next-stage` stops


def _worker_options(args: argparse.Namespace) -> Any:
    """The :class:`WorkerOptions` of ``optim run``'s worker (each of a pool's, less its seed and GPU)."""
    from stagetune.optim.worker import WorkerOptions

    return WorkerOptions(
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
        verbose=not args.quiet,  # a line per epoch unless --quiet
        tensorboard=Path(args.tensorboard) if args.tensorboard else None,
    )


def gpu_ids(text: str) -> list[str]:
    """``--gpus`` as a list of ids.

    Raises:
        UsageError: It names no GPU.
    """
    from stagetune.errors import UsageError

    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus:
        raise UsageError(f"--gpus {text!r}: expected comma-separated GPU ids, e.g. --gpus 0,1")
    return gpus


def _check_gpus_device(text: str, device: str | None, study_name: str | None = None) -> None:
    """``--gpus`` with a device that is no GPU: the workers would train on it regardless.

    Args:
        text: ``--gpus`` as given.
        device: ``--device``, or the study's device when ``study_name`` is given.
        study_name: Whose device it is, when not ``--device``.

    Raises:
        UsageError: ``device`` is set and no CUDA device.
    """
    from stagetune.errors import UsageError

    if device is not None and device.split(":")[0] != "cuda":
        whose = f"--device {device}" if study_name is None else (
            f"study {study_name!r} trains on {device} (its optim init --device), which"
        )
        raise UsageError(
            f"--gpus {text} gives each worker a GPU, but {whose} is no GPU; drop --gpus, or give --device cuda"
        )


def check_gpus_visible(text: str) -> None:
    """``--gpus`` on a node where torch sees no CUDA device would train on the CPU.

    ``torch.cuda.device_count`` asks NVML where it can: CUDA stays uninitialised
    in the pool, which forks its workers later.

    Raises:
        UsageError: No CUDA device is visible.
    """
    import torch

    from stagetune.errors import UsageError

    if torch.cuda.device_count() == 0:
        raise UsageError(f"--gpus {text}: no CUDA device is visible here; drop --gpus to train on the CPU")


def _gpu_sharing(gpus: list[str], workers: int) -> str | None:
    """The warning when ``--gpus`` names fewer or more GPUs than there are workers."""
    if len(gpus) < workers:
        shared = "one GPU" if len(gpus) == 1 else f"{len(gpus)} GPUs"
        return (
            f"--gpus {','.join(gpus)}: {workers} workers share {shared} (worker i on GPU i mod {len(gpus)}); "
            f"fine for small models, else give one GPU id per worker"
        )
    if len(gpus) > workers:
        idle = gpus[workers:]
        return (
            f"--gpus {','.join(gpus)} names {len(gpus)} GPUs for {workers} "
            f"worker{'' if workers == 1 else 's'}: GPU{'' if len(idle) == 1 else 's'} {','.join(idle)} "
            f"stay{'s' if len(idle) == 1 else ''} idle; add --workers {len(gpus)} to use every one"
        )
    return None


def _run_pool(args: argparse.Namespace, study_name: str, options: Any) -> int:
    """``optim run --workers N`` (or ``--gpus``): ``options`` in N worker processes, each its own seed and GPU."""
    import dataclasses

    from stagetune.optim.pool import run_pool
    from stagetune.optim.storage import driver_modules, storage_session
    from stagetune.optim.study import load_study

    gpus = gpu_ids(args.gpus) if args.gpus is not None else []
    # Imported once in the pool, shared by the forked workers (they never import more).
    preload = ["stagetune.optim.worker", *driver_modules(args.url)]
    if args.objective == "train":
        # torch._dynamo: every optimizer's first use imports it (about 3 s); it starts no thread
        preload += ["torch", "torch._dynamo", "stagetune.training", "stagetune.optim.memory", "stagetune.corpus"]

    # One clear error for a missing study or unreachable database, not one per worker.
    # The connections are closed again before forking: every worker opens its own.
    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        _, spec = load_study(storage, study_name, args.url)
    from stagetune.extras import require_sampler

    require_sampler(args.sampler or spec.sampler_name())  # one line here, not one per worker
    if args.objective == "train":
        from stagetune.optim.worker import check_device

        if gpus and args.device is None:
            _check_gpus_device(args.gpus, spec.device, study_name)
            if spec.device is None:
                # A worker must train on its GPU: one that cannot see it (a wrong id)
                # fails at once rather than train on the CPU, cuda's fallback.
                options = dataclasses.replace(options, device="cuda")
        # One error before forking, rather than one from every worker.
        check_device(study_name, spec.device, args.device)
    sharing = _gpu_sharing(gpus, args.workers) if gpus else None
    if sharing:
        _err(f"stagetune: warning: {sharing}")
    from stagetune.cli.pool_child import serve

    result = run_pool(
        args.url, study_name, options, args.workers, serve=serve, threads=args.threads, gpus=gpus, preload=preload,
        out=_err,
    )
    return result.exit_code()


def _important(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.errors import UsageError
    from stagetune.optim.analysis import rank_parameters, select_important
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    from stagetune.extras import require_evaluator

    if args.max_trials is not None and args.max_trials < 0:
        raise UsageError(f"--max-trials must be >= 0 (0: all completed trials), got {args.max_trials}")
    require_evaluator(args.evaluator)  # fanova/mdi without scikit-learn: one line naming the extra
    if args.evaluator == "ped-anova" and "sklearn" not in sys.modules:
        # PED-ANOVA needs no scikit-learn, but importing optuna.importance would
        # load it (seconds) for fANOVA's sake; keep `important` fast.
        sys.modules["sklearn"] = None  # type: ignore[assignment]
    from stagetune.optim.analysis import IMPORTANCE_MAX_TRIALS, completed_in_memory

    if args.out != "-":
        check_output_file(args.out, "OUT", "important.txt")
    max_trials = IMPORTANCE_MAX_TRIALS if args.max_trials is None else (args.max_trials or None)
    with storage_session(args.url, heartbeat_interval=None, create=False, read_only=True) as storage:
        study, _ = load_study(storage, study_name, args.url)
        completed = completed_in_memory(storage, study, max_trials=max_trials, seed=args.seed)
        ranking = rank_parameters(completed, evaluator=args.evaluator, seed=args.seed)
    chosen = select_important(ranking, top_k=args.top_k, threshold=args.threshold)
    if len(completed.trials) < completed.total:
        _err(
            f"ranked on a random sample of {len(completed.trials)} of the {completed.total} completed trials "
            f"(seed {args.seed}; --max-trials 0 ranks all)"
        )
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

    if args.out is None and args.model is None:
        args.out = "-"
    if args.out not in ("-", None):
        check_output_file(args.out, "OUT", "best.ini")
    if args.model is not None:
        if args.independent:
            from stagetune.errors import UsageError

            raise UsageError("--model exports a trained trial's model; --independent's values were never trained together")
        check_output_file(args.model, "--model", "model.pt")
    fmt = args.format
    if fmt is None:
        suffix = Path(args.out).suffix.lower().lstrip(".") if args.out not in ("-", None) else ""
        fmt = {"json": "json", "yaml": "yaml", "yml": "yaml"}.get(suffix, "ini")
    with storage_session(args.url, heartbeat_interval=None, create=False, read_only=True) as storage:
        study, spec = load_study(storage, study_name, args.url)
        config, repairs = best_config(
            study, spec, independent=args.independent, overrides=args.overrides + args.best_set
        )
        if args.model is not None:  # first: a model not kept is an error before anything is said
            from stagetune.cli.optim_tools import export_best_model

            export_best_model(study, study_name, spec, args)
        if args.independent:
            _err(f"each value by its lowest median value (metric {spec.metric})")
        else:
            _err(describe_best(study.best_trial, spec))
    for name, change in repairs.items():
        _err(f"repaired {name}: {change}")
    adapted = _adapted_note(study_name, spec)
    if adapted:
        _err(adapted)
    if args.out is None:
        return 0
    if fmt == "ini":
        text = write_ini(config)
    elif fmt == "json":
        text = json.dumps(to_dict(config), indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(to_dict(config), sort_keys=False)
    if adapted and fmt != "json":  # JSON has no comments: the line on stderr says it
        text = f"# {adapted}\n" + text
    _write_output(args.out, text)
    return 0


def _adapted_note(study_name: str, spec: Any) -> str | None:
    """What reproducing a study's best trial needs beyond its config: the base model it adapted."""
    base = spec.adapt_from
    if not base:
        return None
    return (
        f"study {study_name} adapted base model {base['path']} (hash {base['hash'][:8]}): train this config "
        f"with `stagetune train --adapt-from {base['path']} ...` (training.adapt_rho needs it)"
    )


def _status(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.optim.status import format_status, study_status
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    rounds = 0
    while True:
        with storage_session(args.url, heartbeat_interval=None, create=False, read_only=True) as storage:
            study, spec = load_study(storage, study_name, args.url, same_release=False)  # reading is safe across releases
            status = study_status(study, spec, storage)
        if args.json:
            print(json.dumps(status, default=str))
        else:
            if rounds:  # --watch: on a terminal the screen is redrawn, else the rounds are apart
                sys.stdout.write("\033[H\033[J" if sys.stdout.isatty() else "\n")
            sys.stdout.write(format_status(status))
        sys.stdout.flush()
        rounds += 1
        if args.watch is None or status["budget_met"]:
            break
        import time

        time.sleep(args.watch)
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


def _tools() -> dict[str, Any]:
    from stagetune.cli.optim_tools import COMMANDS

    return COMMANDS
