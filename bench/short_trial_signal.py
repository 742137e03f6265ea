"""Do short trials rank configurations?  Spearman correlation of a 3-epoch metric with 20-epoch dev TER.

Random configurations are drawn from the shipped default search space (every
tunable parameter but ``training.num_epochs``, which is fixed to the long run's
length, and the ``training.early_stopping_*`` fields, left at their defaults: a
sampled patience of 0 or a high threshold ends the long run after a few epochs,
so its "20-epoch" figure would measure the stopping rule, not the
configuration) and trained with the project's own CLI: one ``optim`` study, random
sampler, no pruner, two local workers, the memory check on (configurations over
``--mem-limit-bytes`` are pruned before training, as in a real study, and do
not count).  Every trial keeps its model dir, so each ``history.csv`` holds the
per-epoch dev error and dev loss.  Because the learning-rate schedule counts
updates and never looks at the planned length, epoch 3 of a 20-epoch run is
exactly what a 3-epoch trial would have reported.

Printed: one row per trained configuration, then the Spearman rank correlation
between each ``optim init --metric`` at ``--short-epochs`` and the best dev TER
within ``--long-epochs`` (the model training keeps).  ``error`` is the token error
every study used before the metric option existed ("before").  Then the same
correlations at every short length from 1 epoch up (how short a trial can be and
still rank).  The run resumes where it stopped (the study is
SQLite under ``--out``).

    python bench/short_trial_signal.py --train data/fsdd-connected/train \
        --dev data/fsdd-connected/dev --configs 12

``--around-base W`` draws the configurations near the default instead (``optim init
--around-base W --enqueue-base``: the first is the default itself).
"""

from __future__ import annotations

import argparse
import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from stagetune.optim.metrics import METRICS

STAGETUNE = [sys.executable, "-c", "import sys; from stagetune.cli import main; sys.exit(main())"]
STUDY = "signal"


def _run(args: list[str]) -> None:
    print("+ stagetune " + " ".join(args), flush=True)
    if subprocess.run(STAGETUNE + args).returncode != 0:
        sys.exit(f"short_trial_signal: stagetune {args[args.index('optim') + 3]} failed (see above)")


def _ranks(values: list[float]) -> np.ndarray:
    """Average ranks (ties share their mean rank)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values), dtype=float)
    array = np.asarray(values, dtype=float)
    for value in np.unique(array):
        tied = array == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks)."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def _histories(ckpt: Path) -> dict[int, list[dict[str, str]]]:
    out = {}
    for path in sorted(ckpt.glob("trial-*/history.csv")):
        with path.open() as handle:
            out[int(path.parent.name.split("-")[1])] = list(csv.DictReader(handle))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", default="data/fsdd-connected/train")
    p.add_argument("--dev", default="data/fsdd-connected/dev")
    p.add_argument("--configs", type=int, default=12, help="trials in the study (memory-pruned ones included)")
    p.add_argument("--short-epochs", type=int, default=3)
    p.add_argument("--long-epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1,
                   help="sampler seed (extending a study: a new seed, or the sampler repeats its draws)")
    p.add_argument("--mem-limit-bytes", type=int, default=400_000_000)
    p.add_argument("--out", default="exp/short-trial-signal")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="edit the study's base config (a rerun must repeat them)")
    p.add_argument("--blacklist", nargs="+", default=[], metavar="REGEX",
                   help="more parameters not to tune (e.g. the widths a --set fixes)")
    p.add_argument("--around-base", type=float, default=None, metavar="W",
                   help="draw near the base config: optim init --around-base W (the default config queued first)")
    p.add_argument("--report-only", action="store_true",
                   help="print the table from the model dirs under --out (a run made elsewhere) without training")
    args = p.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        _train(args, out)
    return _report(args, out)


def _train(args: argparse.Namespace, out: Path) -> None:
    url = f"sqlite:///{out}/study.db"
    _run(
        ["--set", f"training.num_epochs={args.long_epochs}"]
        + [x for item in args.sets for x in ("--set", item)]
        + ["optim", "--study-name", STUDY, url,
         "init", args.train, "--dev-dir", args.dev, "--blacklist", r"training\.num_epochs", r"training\.early_stopping_.*",
         r"training\.adapt_rho", *args.blacklist,
         "--num-trials", str(args.configs), "--pruner", "none",
         "--mem-limit-bytes", str(args.mem_limit_bytes), "--force"]  # a larger --configs extends it
        + (["--around-base", str(args.around_base), "--enqueue-base"] if args.around_base is not None else [])
    )
    _run(
        ["optim", "--study-name", STUDY, url, "run", "--workers", str(args.workers),
         "--sampler", "random", "--seed", str(args.seed), "--keep-models",
         "--ckpt-dir", str(out / "ckpt"), "--threads", "1"]
    )


def _report(args: argparse.Namespace, out: Path) -> int:
    rows = []
    for trial, history in _histories(out / "ckpt" / STUDY).items():
        finished = (out / "ckpt" / STUDY / f"trial-{trial}" / "model.pt").exists()
        if not finished or len(history) < args.short_epochs:
            continue  # still training (or pruned before its short epochs)
        short = history[args.short_epochs - 1]
        seconds = sum(float(r["seconds"]) for r in history)
        # The long figure is the best dev TER of the run (the model training keeps).
        best = min(float(r["dev_error"]) for r in history)
        rows.append(
            (trial, float(short["dev_error"]), float(short["dev_loss"]), best,
             float(history[-1]["dev_error"]), len(history), seconds)
        )
    print(f"\n{len(rows)} configurations trained (up to {args.long_epochs} epochs; "
          f"{args.configs} trials, memory limit {args.mem_limit_bytes} bytes)")
    print(f"{'trial':>5} {'err@' + str(args.short_epochs):>8} {'loss@' + str(args.short_epochs):>8} "
          f"{'best err':>8} {'last err':>8} {'epochs':>6} {'seconds':>8}")
    for trial, err_s, loss_s, best, last, epochs, seconds in sorted(rows, key=lambda r: r[3]):
        print(f"{trial:>5} {err_s:>8.2%} {loss_s:>8.4f} {best:>8.2%} {last:>8.2%} {epochs:>6} {seconds:>8.0f}")
    if len(rows) < 3:
        print("too few trained configurations for a correlation")
        return 1
    long_err = [r[3] for r in rows]
    print(f"\nSpearman vs best dev TER within {args.long_epochs} epochs (N={len(rows)}), "
          f"short-trial value after {args.short_epochs} epochs by `optim init --metric`:")
    for name, metric in METRICS.items():
        short = [metric.value(r[1], r[2]) for r in rows]
        before = " (before: the only metric until now)" if name == "error" else ""
        print(f"  {name:<12} {spearman(short, long_err):+.3f}{before}")
    # How short can a trial be? The same correlation at every length the runs reached.
    histories = _histories(out / "ckpt" / STUDY)
    print(f"\nSpearman vs best dev TER within {args.long_epochs} epochs, by the short trial's length "
          f"(epochs: {', '.join(METRICS)}):")
    for k in range(1, args.long_epochs):
        at_k = [histories[r[0]][k - 1] for r in rows if len(histories[r[0]]) >= k]
        if len(at_k) < len(rows):
            break
        figures = [spearman([m.value(float(h["dev_error"]), float(h["dev_loss"])) for h in at_k], long_err)
                   for m in METRICS.values()]
        print(f"  {k:>2}: " + "  ".join(f"{f:+.3f}" for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
