"""Which drawn configurations learn at all within a short trial?  (issue 11)

Reads every study of a ``bench/search_quality.py`` output dir (all strategies and
seeds) and prints, per tuned parameter and value bin, how many completed trials
drew it and which share of them left the CTC all-blank plateau (dev TER below
``--learned``, default 99.9%) within the trial, with the best dev TER among them.
Categorical and integer parameters are binned by value; continuous ones by
quantile bins of what was drawn.  Dev data only: nothing here reads a test set.

    python bench/sq_learners.py exp/sq-small2 [--learned 0.999] [--bins 4] [--runs GLOB ...] [--studies NAME ...]

``--runs random staged staged-narrow --studies sq sq-sm`` reads only random draws from
the full space (the random strategy's study and the random ``sm`` stages); TPE's and
``lg``'s trials are not independent draws, so their shares mix sampler and space.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

_ATTR = "dev_error"


def completed(db: Path, studies: list[str] | None) -> list[tuple[float, dict[str, object]]]:
    """``(dev error, params)`` of every COMPLETE trial in the ``studies`` of ``db`` (None: all)."""
    import json

    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        errors = {tid: json.loads(v) for tid, v, study in con.execute(
            "SELECT a.trial_id, a.value_json, s.study_name FROM trial_user_attributes a JOIN trials t "
            "USING (trial_id) JOIN studies s USING (study_id) WHERE t.state = 'COMPLETE' AND a.key = ?", (_ATTR,))
            if studies is None or study in studies}
        params: dict[int, dict[str, object]] = defaultdict(dict)
        for tid, name, value, dist in con.execute(
                "SELECT trial_id, param_name, param_value, distribution_json FROM trial_params"):
            if tid in errors:
                spec = json.loads(dist)
                choices = spec["attributes"].get("choices")
                if choices is not None:
                    value = choices[int(value)]
                elif spec["name"] == "IntDistribution":
                    value = int(value)
                params[tid][name] = value
    return [(errors[tid], params[tid]) for tid in errors if params[tid]]


def bins_of(values: list[object], bins: int) -> list[tuple[str, object, object]]:
    """``(label, low, high)`` bins: each distinct value when few, else quantile bins."""
    distinct = sorted(set(values), key=lambda v: (str(type(v)), v))
    if len(distinct) <= 8 or not all(isinstance(v, (int, float)) for v in distinct):
        return [(repr(v), v, v) for v in distinct]
    edges = np.unique(np.quantile(np.asarray(values, dtype=float), np.linspace(0, 1, bins + 1)))
    last = len(edges) - 2
    return [(f"[{lo:.3g}, {hi:.3g}{']' if i == last else ')'}", lo, hi)
            for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a bench/search_quality.py --out dir")
    parser.add_argument("--learned", type=float, default=0.999, help="dev TER below this counts as learned")
    parser.add_argument("--bins", type=int, default=4, help="quantile bins of a continuous parameter")
    parser.add_argument("--runs", nargs="+", default=["*"], metavar="GLOB",
                        help="strategy dirs to read (globs; default all)")
    parser.add_argument("--studies", nargs="+", default=None, metavar="NAME",
                        help="study names to read (default all; e.g. sq sq-sm: flat studies and sm stages)")
    args = parser.parse_args(argv)
    dbs = sorted({db for run in args.runs for db in args.out.glob(f"{run}/seed-*/optim.db")})
    if not dbs:
        parser.error(f"{args.out}: no */seed-*/optim.db (not a search_quality.py output dir?)")
    rows = [row for db in dbs for row in completed(db, args.studies)]
    learned = sum(e < args.learned for e, _ in rows)
    print(f"{len(rows)} completed trials in {len(dbs)} runs; {learned} ({learned / max(len(rows), 1):.0%}) "
          f"below {args.learned:.1%} dev TER\n")
    print("| parameter | drawn | trials | learned | best dev TER |")
    print("| --- | --- | ---: | ---: | ---: |")
    names = sorted({n for _, p in rows for n in p})
    for name in names:
        drawn = [(e, p[name]) for e, p in rows if name in p]
        for label, lo, hi in bins_of([v for _, v in drawn], args.bins):
            last = label.endswith("]") or lo == hi
            inside = [e for e, v in drawn
                      if (v == lo if lo == hi else (lo <= v <= hi if last else lo <= v < hi))]
            if not inside:
                continue
            share = sum(e < args.learned for e in inside) / len(inside)
            print(f"| {name} | {label} | {len(inside)} | {share:.0%} | {min(inside):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
