"""``stagetune optim DB_URL report|list|delete``: looking at studies and tidying them.

Registered by :mod:`stagetune.cli.optim` (:func:`add_parsers`, :data:`COMMANDS`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

__all__ = ["add_parsers", "COMMANDS", "NAMES"]

#: The sub-commands this module adds, in ``--help`` order.
NAMES = ("report", "list", "delete", "dashboard")


def add_parsers(cmds: argparse._SubParsersAction) -> list[argparse.ArgumentParser]:
    """Add the sub-parsers; returns them (the caller adds the global options)."""
    report = cmds.add_parser(
        "report", help="figures (PNG) and index.html of a study",
        description="Write OUT_DIR/index.html with a summary table and figures: best so far, parameter "
        "importances, learning curves (pruned trials marked), parallel coordinates of the top parameters, "
        "memory footprint against the value, trials per worker; each figure's data is in report.json. "
        "An existing report in OUT_DIR is replaced whole.",
    )
    report.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (or an earlier report to replace)")
    report.add_argument("--evaluator", default="ped-anova", help="importance evaluator: ped-anova (default), fanova or mdi")
    listing = cmds.add_parser("list", help="the studies in the database, with progress and best value")
    listing.add_argument("--json", action="store_true")
    delete = cmds.add_parser(
        "delete", help="delete a study and its trial checkpoints",
        description="Delete STUDY and CKPT_DIR/STUDY (its trials' checkpoints and kept models). Refused while "
        "workers hold running trials (heartbeat within the grace period), unless --force.",
    )
    delete.add_argument("study", metavar="STUDY", help="the study to delete (spelled out, never the default)")
    delete.add_argument("--ckpt-dir", default="stagetune-ckpt", metavar="DIR", help="as given to optim run")
    delete.add_argument("--force", action="store_true", help="delete even while workers run trials")
    delete.add_argument("--grace-period", type=float, default=None, metavar="SECONDS",
                        help="a running trial whose heartbeat is older is no worker's (default: the study's, else 60)")
    dashboard = cmds.add_parser(
        "dashboard", help="optuna-dashboard on the database, bound to 127.0.0.1 (extra: dashboard)",
        description="Serve optuna-dashboard for every study in DB_URL on 127.0.0.1:PORT only (reach it from "
        "another machine through an ssh tunnel; the command prints the line). Ctrl-C stops it.",
    )
    dashboard.add_argument("--port", type=int, default=8080, metavar="P", help="default 8080")
    return [report, listing, delete, dashboard]


def _err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _report(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.errors import UsageError
    from stagetune.optim.registry import EVALUATORS
    from stagetune.optim.report import check_out_dir, study_report, write_report_dir, write_study_report

    if args.evaluator not in EVALUATORS:
        raise UsageError(f"--evaluator {args.evaluator!r}: choose one of {', '.join(sorted(EVALUATORS))}")
    from stagetune.extras import require_evaluator

    require_evaluator(args.evaluator)  # fanova/mdi without scikit-learn: one line naming the extra
    out = check_out_dir(args.out_dir)
    if args.evaluator == "ped-anova" and "sklearn" not in sys.modules:
        sys.modules["sklearn"] = None  # type: ignore[assignment]  # as `optim important`: seconds saved
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        study, spec = load_study(storage, study_name, args.url, same_release=False)
        report = study_report(study, spec, storage, evaluator=args.evaluator)
    write_report_dir(out, lambda tmp: write_study_report(report, tmp))
    drawn = sum(1 for f in report["figures"].values() if f.get("file"))
    skipped = [k for k, f in report["figures"].items() if not f.get("file")]
    print(f"report of study {study_name}: {out / 'index.html'} ({drawn} figures"
          + (f"; skipped: {', '.join(skipped)}" if skipped else "") + ")")
    return 0


def _list(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.optim.manage import format_list, list_studies
    from stagetune.optim.storage import storage_session

    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        rows = list_studies(storage)
    if args.json:
        print(json.dumps(rows))
    elif rows:
        sys.stdout.write(format_list(rows))
    else:
        print("no studies")
    return 0


def _delete(args: argparse.Namespace, study_name: str) -> int:
    from stagetune.cli.optim import _check_study_name
    from stagetune.optim.manage import delete_study
    from stagetune.optim.storage import mask_url, storage_session

    _check_study_name(args.study, "STUDY")
    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        count = delete_study(storage, args.study, Path(args.ckpt_dir), force=args.force,
                             grace_period=args.grace_period, log=_err)
    print(f"deleted study {args.study} ({count} trial{'s' if count != 1 else ''}) from {mask_url(args.url)}")
    return 0


def _dashboard(args: argparse.Namespace, study_name: str) -> int:
    import getpass
    import socket

    from stagetune.errors import UsageError
    from stagetune.extras import require

    require("optim dashboard", ("optuna_dashboard", "optuna-dashboard", "dashboard"))
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    with socket.socket() as probe:  # a clear error now, not a traceback from the server
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as exc:
            raise UsageError(f"--port {args.port}: 127.0.0.1:{args.port} is taken ({exc.strerror}); give another --port") from None
    from optuna_dashboard import run_server

    from stagetune.optim.storage import mask_url, storage_session

    with storage_session(args.url, heartbeat_interval=None, create=False) as storage:
        root = f"http://127.0.0.1:{args.port}/dashboard/"
        try:
            page = f"{root}studies/{storage.get_study_id_from_name(study_name)}"
        except KeyError:  # the default name of a database whose studies are named otherwise
            page = root
        print(f"optuna-dashboard of {mask_url(args.url)}: {page}")
        print(f"from another machine: ssh -N -L {args.port}:127.0.0.1:{args.port} "
              f"{getpass.getuser()}@{socket.gethostname()}, then open {page}")
        print("Ctrl-C stops it", flush=True)
        _serve_until_signalled(lambda: run_server(storage, host="127.0.0.1", port=args.port))
    return 130  # as every command stopped by Ctrl-C


def _serve_until_signalled(serve: Callable[[], None]) -> None:
    """Run ``serve`` in a daemon thread until Ctrl-C or SIGTERM (or until it ends).

    The main thread only waits, so a signal is acted on at once even while a request
    is stuck in C code (a SQLite read waiting for a writer's lock, an importance
    computation on a big study): stopping never waits for the server. Started with
    SIGINT ignored (a background job of a non-interactive shell), Python would never
    raise KeyboardInterrupt: both signals are (re)installed here.
    """
    import signal
    import threading

    failure: list[BaseException] = []

    def target() -> None:
        try:
            serve()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failure.append(exc)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    server = threading.Thread(target=target, name="optuna-dashboard", daemon=True)
    server.start()
    try:
        while server.is_alive():
            server.join(0.2)
    except KeyboardInterrupt:
        return
    if failure:
        raise failure[0]


COMMANDS: dict[str, Any] = {"report": _report, "list": _list, "delete": _delete, "dashboard": _dashboard}


def export_best_model(study: Any, study_name: str, spec: Any, args: argparse.Namespace) -> None:
    """``optim best --model OUT_PT``: copy the best trial's kept model.pt, whole or not at all."""
    import os
    import shutil

    from stagetune.errors import StagetuneError
    from stagetune.optim.manage import best_model_path

    number, source = best_model_path(study, study_name, spec, Path(args.ckpt_dir))
    out = Path(args.model)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StagetuneError(f"cannot write {out}: {exc.strerror or exc}") from None
    _err(f"model of trial {number}: {source} -> {out}")


def add_plan_report_parser(actions: argparse._SubParsersAction) -> None:
    """``plan PLAN.ini report OUT_DIR`` (registered by :mod:`stagetune.cli.plan`)."""
    rep = actions.add_parser(
        "report", help="figures of every stage and the stages side by side (index.html)",
        description="Write OUT_DIR/index.html: the stage table, stages.png (best value and trials against the "
        "budget per stage) and, per stage whose study exists, the figures of optim report (in OUT_DIR/STAGE/).",
    )
    rep.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (or an earlier report to replace)")
    rep.add_argument("--evaluator", default="ped-anova", help="importance evaluator: ped-anova (default), fanova or mdi")


def plan_report(plan: Any, args: argparse.Namespace) -> int:
    """``plan PLAN.ini report OUT_DIR``."""
    from stagetune.errors import UsageError
    from stagetune.extras import require_evaluator
    from stagetune.optim.registry import EVALUATORS
    from stagetune.optim.report import check_out_dir, write_report_dir

    if args.evaluator not in EVALUATORS:
        raise UsageError(f"--evaluator {args.evaluator!r}: choose one of {', '.join(sorted(EVALUATORS))}")
    require_evaluator(args.evaluator)
    out = check_out_dir(args.out_dir)
    if args.evaluator == "ped-anova" and "sklearn" not in sys.modules:
        sys.modules["sklearn"] = None  # type: ignore[assignment]
    from stagetune.plan.report import plan_report as build, write_plan_report

    data = build(plan, evaluator=args.evaluator)
    write_report_dir(out, lambda tmp: write_plan_report(data, tmp))
    print(f"report of plan {plan.name}: {out / 'index.html'} ({len(data['stages'])} of "
          f"{len(data['plan']['stages'])} stages started)")
    return 0
