"""``stagetune demo [OUT_DIR]``: the main job end to end, from an installed package.

What ``bash scripts/demo.sh`` runs (the script is a thin wrapper now): the
synthetic demo corpus in ``OUT_DIR/data`` (made once), the packaged plan
``@plans/demo`` with its paths pointed into ``OUT_DIR`` (written to
``OUT_DIR/demo.ini``; its studies are ``demo-sm`` and ``demo-lg`` in
``OUT_DIR/optim.db``), beside it the shipped default config trained for as long,
then both evaluated on the test split and printed with the plan's status table.
Rerunning continues where it stopped.  ``--size tiny`` is the smallest run that
still takes every step (16 training utterances, 2 one-epoch trials in the first
stage and 1 in the next, a one-epoch final model): a smoke test, not a search.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

from stagetune.cli._common import positive_int

__all__ = ["add_parser", "run", "SIZES", "demo_plan_text"]

#: Size -> (corpus sizes, trial cap of a first / a derived stage, epochs per trial and of the final
#: model; None: the plan's).
SIZES: dict[str, tuple[dict[str, int], tuple[int, int] | None, int | None]] = {
    "full": ({"num_train": 360, "num_dev": 60, "num_test": 60}, None, None),
    # 2 trials rank parameters for a derived stage, whose one trial is its parent's best
    "tiny": ({"num_train": 16, "num_dev": 4, "num_test": 4}, (2, 1), 1),
}
_PLAN = "plans/demo"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the demo end to end: synthetic corpus -> staged search -> best vs default on test",
        description="Make the synthetic demo corpus in OUT_DIR/data (once), run the packaged demo plan "
        "(@plans/demo, its paths pointed into OUT_DIR) with its local workers while the shipped default "
        "config trains as long beside it, evaluate both on the test split and print them with the plan's "
        "status table. Rerunning continues where it stopped; remove OUT_DIR to start over.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", nargs="?", default="exp/demo", help="default: exp/demo")
    p.add_argument(
        "--size", choices=sorted(SIZES), default="full",
        help="full (default: about 10 minutes on 2 CPU cores) or tiny (every step at its smallest: a smoke "
        "test of an installation, about a minute)",
    )
    p.add_argument("--workers", type=positive_int, default=None, metavar="N", help="local workers per stage (default: the plan's)")
    p.set_defaults(func=run)


def demo_plan_text(out_dir: str, size: str) -> str:
    """The packaged demo plan with its data, database and output under ``out_dir``, cut to ``size``."""
    from stagetune.packaged import resolve

    source = resolve("@" + _PLAN, "plan")
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=("#", ";"), strict=True, default_section="\0none"
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(source.read_text(encoding="utf-8"), source=str(source))
    data = f"{out_dir}/data"
    plan = parser["plan"]
    plan.update(train=f"{data}/train", dev=f"{data}/dev", test=f"{data}/test",
                url=f"sqlite:///{out_dir}/optim.db", out_dir=out_dir)
    plan.pop("name", None)  # the file's stem, demo: studies demo-sm, demo-lg as with the packaged plan
    _, trial_cap, epochs = SIZES[size]
    if epochs is not None:
        plan["final_epochs"] = str(epochs)
    for name in parser.sections():
        stage = parser[name]
        if name == "plan":
            continue
        if trial_cap is not None and "trials" in stage:
            cap = trial_cap[1] if "from" in stage else trial_cap[0]
            stage["trials"] = str(min(int(stage["trials"]), cap))
        if epochs is not None and "epochs" in stage:
            stage["epochs"] = str(epochs)
    text = io.StringIO()
    parser.write(text)
    header = (
        f"# stagetune demo --size {size}: the packaged @{_PLAN} with its paths under {out_dir}\n"
        f"# (written by `stagetune demo`; rerunning it rewrites this file)\n"
    )
    return header + text.getvalue()


def run(args: argparse.Namespace) -> int:
    from stagetune.cli import main
    from stagetune.cli._common import write_output_file
    from stagetune.demo import main as make_corpus
    from stagetune.errors import StagetuneError, UsageError

    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"OUT_DIR {out} exists and is not a directory")
    out_text = out.as_posix().rstrip("/") or "."
    plan_path = out / "demo.ini"
    text = demo_plan_text(out_text, args.size)
    if plan_path.is_file():
        first = plan_path.read_text(encoding="utf-8").partition("\n")[0]
        if first != text.partition("\n")[0]:
            raise UsageError(
                f"{out} holds a demo of another size ({first.removeprefix('# ').split(':')[0]}); "
                f"remove {out} to start over, or give another OUT_DIR"
            )
    data = out / "data"
    if not (data / "test" / "feats.scp").is_file():
        corpus, _, _ = SIZES[args.size]
        argv = [str(data), *(x for k, v in corpus.items() for x in (f"--{k.replace('_', '-')}", str(v)))]
        code = make_corpus(argv)
        if code != 0:
            return code
    write_output_file(plan_path, text)
    from stagetune.plan.spec import read_plan

    plan = read_plan(plan_path)
    final_epochs = plan.final_epochs or 8
    # The shipped default config, for comparison, on the core the plan leaves idle
    # (it resumes when rerun; a finished one returns at once).
    default_dir = out / "default"
    default = subprocess.Popen(
        [sys.executable, "-m", "stagetune", "--set", f"training.num_epochs={final_epochs}", "train",
         str(data / "train"), str(data / "dev"), str(default_dir), "--threads", "1", "--quiet"],
        preexec_fn=lambda: os.nice(5),
    )
    try:
        code = main(["plan", str(plan_path), "run", *(["--workers", str(args.workers)] if args.workers else [])])
        default_code = default.wait()
    finally:
        if default.poll() is None:
            default.terminate()
            default.wait()
    if code != 0:
        return code
    if default_code != 0:
        raise StagetuneError(f"training the default config in {default_dir} failed (exit {default_code})")
    results = {}
    for name, model_dir in (("default", default_dir), ("test", out / "final")):
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            code = main(["evaluate", str(model_dir / "model.pt"), str(data / "test"), "--out", str(model_dir / "test.hyp")])
        if code != 0:
            return code
        results[name] = captured.getvalue().strip()
        write_output_file(out / f"{name}.result", captured.getvalue())
    print("\n== summary", flush=True)
    main(["plan", str(plan_path), "status"])
    print(f"default config, test: {results['default']}")
    print(f"best found,     test: {results['test']}")
    print(f"best config: {out_text}/best.ini; model: {out_text}/final/model.pt")
    print(f"studies: sqlite:///{out_text}/optim.db (stagetune optim --study-name demo-lg "
          f"sqlite:///{out_text}/optim.db status)")
    print(f"browse them: pip install 'stagetune[dashboard]' && optuna-dashboard sqlite:///{out_text}/optim.db")
    sys.stdout.flush()
    return 0
