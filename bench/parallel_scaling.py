"""How many workers one study keeps busy: wall time versus ideal, per backend.

For each backend and worker count W, a fresh study with a budget of
``--trials-per-worker`` x W trials gets W real workers, launched two ways
(``--launch``): ``processes`` starts W CLI processes at once, as separate
shells or Slurm tasks would,

    stagetune optim --study-name scaling URL run --objective sleep \\
        --sleep-seconds S --threads 1 --sampler random --seed I

and ``pool`` runs one ``... run --workers W --seed 0`` (the local pool, which
forks its workers after importing once).

Each trial samples the full search space and sleeps S seconds, so the ideal wall
time is trials x S / W. Reported per run:

* ``wall``: from starting the processes until the last one exits (includes
  interpreter and import start-up, which on a small machine is most of the gap);
* ``up``: from starting the processes until W trials have started (about
  when the last worker is up: start-up of W interpreters on the machine's cores);
* ``span``: first trial start to last trial completion, from the trials'
  timestamps in the database (the scheduling, plus the workers' staggered start);
* ``trial``: median trial duration (start to completion; S plus sampling and
  reporting under contention);
* efficiency = ideal / wall and ideal / span;
* the exact finished count and every trial state (the budget must be met
  exactly: no missing and no extra trial).

PostgreSQL and MariaDB are throwaway servers started and stopped here.

Run: ``.venv/bin/python bench/parallel_scaling.py`` (about 3 minutes on 2
cores, both launches), ``--quick`` for 1, 4 and 8 workers with 2 trials each.
Results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import databases, parse_backends  # noqa: E402
from optim_overhead import STUDY, create_study  # noqa: E402  (a synthetic spec: no data needed)

from stagetune.optim.storage import close_storage, open_storage  # noqa: E402


@dataclass
class Result:
    launch: str
    backend: str
    workers: int
    trials: int
    wall_s: float
    span_s: float
    up_s: float
    trial_s: float
    states: Counter[str]
    exit_codes: list[int]


def _stagetune() -> str:
    beside = Path(sys.executable).with_name("stagetune")
    return str(beside) if beside.exists() else (shutil.which("stagetune") or "stagetune")


def run_config(url: str, backend: str, workers: int, trials: int, seconds: float, launch: str) -> Result:
    create_study(url, trials)
    command = [_stagetune(), "optim", "--study-name", STUDY, url, "run", "--objective", "sleep",
               "--sleep-seconds", str(seconds), "--threads", "1", "--sampler", "random"]
    if launch == "pool":  # one command: the pool forks its workers
        commands = [[*command, "--workers", str(workers), "--seed", "0"]]
    else:  # one command per worker, as separate shells or Slurm tasks start them
        commands = [[*command, "--seed", str(i)] for i in range(workers)]
    began, launched = time.perf_counter(), datetime.datetime.now()  # optuna stamps trials with local time
    procs = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - began
    codes = [p.returncode for p in procs]
    for code, err in zip(codes, errors):
        if code != 0:
            print(f"  a worker exited {code}:\n{err[-2000:]}", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = open_storage(url, heartbeat_interval=None, create=False)
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
        frozen = study.get_trials(deepcopy=False)
    finally:
        close_storage(storage)
    states = Counter(t.state.name for t in frozen)
    done = [t for t in frozen if t.datetime_complete is not None and t.datetime_start is not None]
    if not done:
        return Result(launch, backend, workers, trials, wall, *(float("nan"),) * 3, states, codes)
    starts = sorted(t.datetime_start for t in done)
    span = (max(t.datetime_complete for t in done) - starts[0]).total_seconds()
    up = (starts[min(workers, len(starts)) - 1] - launched).total_seconds()
    durations = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return Result(launch, backend, workers, trials, wall, span, up, durations[len(durations) // 2], states, codes)


def report(results: list[Result], seconds: float) -> None:
    header = (f"{'launch':<9} {'backend':<11} {'workers':>7} {'trials':>6} {'ideal s':>7} {'wall s':>7} {'eff wall':>8} "
              f"{'up s':>5} {'span s':>7} {'eff span':>8} {'trial s':>7}  finished (states)")
    print()
    print(header)
    print("-" * len(header))
    for r in results:
        ideal = r.trials * seconds / r.workers
        finished = r.states["COMPLETE"] + r.states["PRUNED"]
        exact = "exact" if finished == r.trials and sum(r.states.values()) == r.trials else "NOT EXACT"
        others = ", ".join(f"{n} {s}" for s, n in sorted(r.states.items()))
        bad = "" if all(c == 0 for c in r.exit_codes) else f"; exit codes {sorted(set(r.exit_codes))}"
        print(f"{r.launch:<9} {r.backend:<11} {r.workers:>7} {r.trials:>6} {ideal:>7.1f} {r.wall_s:>7.1f} "
              f"{100 * ideal / r.wall_s:>7.0f}% {r.up_s:>5.1f} {r.span_s:>7.1f} {100 * ideal / r.span_s:>7.0f}% "
              f"{r.trial_s:>7.2f}  "
              f"{finished}/{r.trials} {exact} ({others}){bad}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql,mysql", help="comma list or 'all'")
    parser.add_argument("--workers", default="1,4,8,16", help="comma list of worker counts")
    parser.add_argument("--seconds", type=float, default=1.0, help="sleep per trial (default 1)")
    parser.add_argument("--trials-per-worker", type=int, default=4, help="budget = this x workers (default 4)")
    parser.add_argument("--launch", default="processes,pool",
                        help="comma list: 'processes' (one CLI process per worker) and/or 'pool' "
                             "(one `optim run --workers W`); default both")
    parser.add_argument("--quick", action="store_true", help="workers 1,4,8 and 2 trials per worker")
    parser.add_argument("--sqlite-dir", type=Path, default=None, help="where the SQLite files go")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers, args.trials_per_worker = "1,4,8", 2
    counts = [int(w) for w in args.workers.split(",") if w.strip()]
    if not counts or min(counts) < 1 or args.trials_per_worker < 1 or args.seconds < 0:
        parser.error("--workers must list positive counts; --trials-per-worker >= 1; --seconds >= 0")
    backends = parse_backends(args.backends)
    launches = [m.strip() for m in args.launch.split(",") if m.strip()]
    if not launches or set(launches) - {"processes", "pool"}:
        parser.error("--launch must list 'processes' and/or 'pool'")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"parallel scaling: {', '.join(backends)}; workers {counts}; {args.trials_per_worker} trials "
          f"per worker of {args.seconds:g} s; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    results = []
    began = time.perf_counter()
    with databases(backends, args.sqlite_dir) as make_url:
        for backend in backends:
            for workers in counts:
                for launch in launches:
                    r = run_config(make_url(backend), backend, workers, args.trials_per_worker * workers,
                                   args.seconds, launch)
                    finished = r.states["COMPLETE"] + r.states["PRUNED"]
                    print(f"  {launch} {backend} x{workers}: {r.wall_s:.1f} s wall, {finished}/{r.trials} finished",
                          flush=True)
                    results.append(r)
    report(results, args.seconds)
    print(f"total {time.perf_counter() - began:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    exact = all(r.states["COMPLETE"] + r.states["PRUNED"] == r.trials == sum(r.states.values()) for r in results)
    return 0 if exact and all(c == 0 for r in results for c in r.exit_codes) else 1


if __name__ == "__main__":
    sys.exit(main())
