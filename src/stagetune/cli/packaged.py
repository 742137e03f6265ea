"""``stagetune list-configs [NAME]`` and ``stagetune slurm-template [OUT]``: what the package ships.

Configs and plans are found by name wherever the package is installed
(``--read-ini @optim/model-sm``, ``stagetune plan @plans/demo status``); the
Slurm worker template is printed or written where the user wants it.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_parser", "run_list", "run_slurm"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    ls = sub.add_parser(
        "list-configs",
        help="list the packaged configs and plans (use them as @NAME), or print one",
        description="Without NAME: each packaged config and plan as @NAME with its summary line. "
        "With NAME: print that file (e.g. to copy a plan and edit it). Use @NAME wherever a config "
        "file goes (--read-ini @optim/model-sm, a plan's config = @optim/model-sm) and for a plan "
        "(stagetune plan @plans/demo status).",
    )
    ls.add_argument("name", metavar="NAME", nargs="?", help="print this config or plan (with or without @)")
    ls.set_defaults(func=run_list)
    sl = sub.add_parser(
        "slurm-template",
        help="print (or write) the Slurm array job script of stagetune workers",
        description="The sbatch script that runs one `stagetune optim ... run` worker per array task: "
        "sbatch --array=0-7 optim-worker.sbatch DB_URL STUDY [optim run options].",
    )
    sl.add_argument("out", metavar="OUT", nargs="?", default="-", help="file to write (made executable), or - for stdout")
    sl.add_argument("--name", default="optim-worker", help="which template (default: optim-worker)")
    sl.set_defaults(func=run_slurm)


def run_list(args: argparse.Namespace) -> int:
    from stagetune.packaged import CONF_DIR, PREFIX, config_names, describe, resolve, slurm_templates

    if args.name is not None:
        name = args.name if args.name.startswith(PREFIX) else PREFIX + args.name
        kind = "plan" if name.startswith(PREFIX + "plans/") else "config"
        sys.stdout.write(resolve(name, kind).read_text(encoding="utf-8"))
        return 0
    names = config_names()
    width = max((len(n) for n in names), default=0) + len(PREFIX)
    for name in names:
        print(f"{PREFIX + name:<{width}}  {describe(CONF_DIR / f'{name}.ini')}".rstrip())
    templates = ", ".join(slurm_templates()) or "none"
    print(f"(in {CONF_DIR.resolve()}; Slurm templates, see stagetune slurm-template: {templates})")
    return 0


def run_slurm(args: argparse.Namespace) -> int:
    from stagetune.cli._common import check_output_file, write_output_file
    from stagetune.errors import UsageError
    from stagetune.packaged import slurm_templates

    templates = slurm_templates()
    if args.name not in templates:
        raise UsageError(f"--name {args.name!r}: no such Slurm template; packaged: {', '.join(templates) or 'none'}")
    text = templates[args.name].read_text(encoding="utf-8")
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = check_output_file(args.out, "OUT", f"{args.name}.sbatch")
    write_output_file(out, text)
    out.chmod(out.stat().st_mode | 0o111)
    print(f"wrote {out}: sbatch --array=0-7 {out} DB_URL STUDY", file=sys.stderr)
    return 0
