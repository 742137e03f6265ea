"""Per-trial overhead of a stagetune worker versus bare optuna, side by side.

Both sides run the same cheap objective over the same search space with the
same sampler and seed on the same kind of storage, so only the machinery
differs:

* ``stagetune``: :func:`stagetune.optim.worker.run_worker` with
  ``--objective quadratic --sampler random`` (budget lock and slot counting,
  stale-trial check, heartbeat, outage retries, signal handling, logging);
* ``bare``: ``optuna.storages.RDBStorage(url)`` with optuna's defaults,
  ``optuna.load_study`` and ``study.optimize`` calling the very same objective
  function (``OBJECTIVES["quadratic"]``: ``sample_values`` over the study's
  tuned parameters, then a sum of logs), no heartbeat.

Each run gets a fresh database holding one study (created untimed, with the
same journal mode for both sides); the timed span is opening the storage,
loading the study and running every trial. Runs alternate A B, B A, ... (the
machine is shared and noisy) and medians are reported, of wall time and of
process CPU time (all threads), per trial. A further untimed pass counts SQL
statements and commits per trial on each side, which noise cannot blur. The
CLI line adds interpreter start-up: ``stagetune optim ... run`` in a
subprocess, and the same command on a study whose budget is met (start-up and
shut-down alone).

Run: ``.venv/bin/python bench/optim_overhead.py --backend all`` (about 5
minutes on 2 idle cores; PostgreSQL and MariaDB are throwaway servers started
and stopped here). Results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from sqlalchemy import event

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import databases, parse_backends  # noqa: E402

from stagetune.config import Config, to_dict  # noqa: E402
from stagetune.optim.objective import OBJECTIVES, TrialContext  # noqa: E402
from stagetune.optim.sampling import select_tunable  # noqa: E402
from stagetune.optim.spec import StudySpec  # noqa: E402
from stagetune.optim.storage import close_storage, open_storage  # noqa: E402
from stagetune.optim.registry import PRUNERS  # noqa: E402
from stagetune.optim.study import init_study, read_spec  # noqa: E402
from stagetune.optim.worker import WorkerOptions, run_worker  # noqa: E402

STUDY = "overhead"
SIDES = ("stagetune", "bare")


@dataclass
class Timing:
    wall_s: float
    cpu_s: float


def synthetic_spec(num_trials: int, pruner: str = "none") -> StudySpec:
    """A study over every tunable parameter of the default config; no data is read."""
    base = Config()
    return StudySpec(
        base_config=to_dict(base),
        tuned=list(select_tunable(base).tuned),
        dropped=[],
        train_dir="/dev/null",  # quadratic never loads data
        dev_dir=None,
        dev_proportion=0.1,
        feat_dim=40,
        tokens=["a", "b"],
        longest_utterance=100,
        longest_transcript=10,
        num_train_utterances=1,
        num_dev_utterances=1,
        num_trials=num_trials,
        pruner=pruner,
    )


def create_study(url: str, num_trials: int, pruner: str = "none") -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = open_storage(url, heartbeat_interval=None)
    try:
        init_study(storage, STUDY, url, synthetic_spec(num_trials, pruner), log=lambda _m: None)
    finally:
        close_storage(storage)


def run_stagetune(url: str, num_trials: int, seed: int) -> Timing:
    wall, cpu = time.perf_counter(), time.process_time()
    summary = run_worker(
        url, STUDY, WorkerOptions(sampler="random", seed=seed, objective="quadratic"), log=lambda _m: None
    )
    timing = Timing(time.perf_counter() - wall, time.process_time() - cpu)
    if summary.counts["COMPLETE"] != num_trials:
        raise SystemExit(f"stagetune ran {summary.counts} instead of {num_trials} complete trials")
    return timing


def run_bare(url: str, num_trials: int, seed: int) -> Timing:
    objective = OBJECTIVES["quadratic"]
    with warnings.catch_warnings():  # untimed: the study's pruner, to give bare optuna the same one
        warnings.simplefilter("ignore")
        storage = open_storage(url, heartbeat_interval=None, create=False)
    try:
        spec = read_spec(storage, STUDY, url)
    finally:
        close_storage(storage)
    pruner = PRUNERS[spec.pruner](spec.config().training.num_epochs)
    wall, cpu = time.perf_counter(), time.process_time()
    storage = optuna.storages.RDBStorage(url)
    study = optuna.load_study(
        study_name=STUDY,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(seed=seed),
        pruner=pruner,
    )
    ctx = TrialContext(study=study, spec=spec, device=None, ckpt_dir=Path("unused"))
    study.optimize(lambda trial: objective(ctx, trial), n_trials=num_trials)
    storage.engine.dispose()
    timing = Timing(time.perf_counter() - wall, time.process_time() - cpu)
    done = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    if done != num_trials:
        raise SystemExit(f"bare optuna completed {done} instead of {num_trials} trials")
    return timing


RUNNERS = {"stagetune": run_stagetune, "bare": run_bare}


def count_statements(url: str, side: str, num_trials: int) -> tuple[float, float]:
    """SQL statements and commits per trial (every engine in this process, all threads)."""
    counts = {"statements": 0, "commits": 0}

    def on_execute(*_a: object) -> None:
        counts["statements"] += 1

    def on_commit(*_a: object) -> None:
        counts["commits"] += 1

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
    event.listen(sqlalchemy.engine.Engine, "commit", on_commit)
    try:
        RUNNERS[side](url, num_trials, 0)
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
        event.remove(sqlalchemy.engine.Engine, "commit", on_commit)
    return counts["statements"] / num_trials, counts["commits"] / num_trials


def run_cli(url: str, seed: int) -> float:
    command = [_stagetune(), "optim", "--study-name", STUDY, url, "run",
               "--objective", "quadratic", "--sampler", "random", "--seed", str(seed)]
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def _stagetune() -> str:
    beside = Path(sys.executable).with_name("stagetune")
    return str(beside) if beside.exists() else (shutil.which("stagetune") or "stagetune")


def _ms(seconds: float, num_trials: int) -> float:
    return 1000.0 * seconds / num_trials


def bench_backend(make_url: Callable[[str], str], backend: str, args: argparse.Namespace) -> dict[str, Any]:
    n = args.trials
    times: dict[str, list[Timing]] = {side: [] for side in SIDES}
    for rep in range(args.repeats):
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        for side in order:
            url = make_url(backend)
            create_study(url, n, args.pruner)
            times[side].append(RUNNERS[side](url, n, rep))
        print(
            f"  {backend} rep {rep + 1}/{args.repeats}: "
            + ", ".join(f"{s} {_ms(times[s][-1].wall_s, n):.1f} ms/trial" for s in SIDES),
            flush=True,
        )
    result: dict[str, Any] = {"backend": backend}
    for metric in ("wall_s", "cpu_s"):
        med = {s: statistics.median(getattr(t, metric) for t in times[s]) for s in SIDES}
        paired = sorted(getattr(a, metric) / getattr(b, metric) for a, b in zip(times["stagetune"], times["bare"]))
        result[metric] = {
            **{s: _ms(med[s], n) for s in SIDES},
            "ratio": med["stagetune"] / med["bare"],
            "paired": (statistics.median(paired), paired[0], paired[-1]),
        }
    counting_trials = result["counting_trials"] = min(n, 10)
    for side in SIDES:
        url = make_url(backend)
        create_study(url, counting_trials, args.pruner)
        result[f"sql_{side}"] = count_statements(url, side, counting_trials)
    if args.cli_repeats:
        cli, startup = [], []
        for rep in range(args.cli_repeats):
            url = make_url(backend)
            create_study(url, n, args.pruner)
            cli.append(run_cli(url, rep))
            startup.append(run_cli(url, rep))  # budget met: start-up and shut-down only
        result["cli"] = (statistics.median(cli), statistics.median(startup))
    return result


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    n = args.trials
    print()
    print(f"per-trial cost, {n} trials x {args.repeats} interleaved runs per side, medians "
          "(paired ratio: median [min..max] of per-run stagetune/bare)")
    header = f"{'backend':<11} {'metric':<5} {'stagetune ms':>12} {'bare ms':>8} {'ratio':>6}  paired ratio"
    print(header)
    print("-" * len(header))
    for r in results:
        for metric, label in (("wall_s", "wall"), ("cpu_s", "cpu")):
            m = r[metric]
            mid, low, high = m["paired"]
            print(f"{r['backend']:<11} {label:<5} {m['stagetune']:>12.1f} {m['bare']:>8.1f} {m['ratio']:>6.3f}  "
                  f"{mid:.3f} [{low:.3f}..{high:.3f}]")
    print()
    print(f"SQL per trial (untimed pass, {results[0]['counting_trials']} trials): statements / commits")
    for r in results:
        st, bare = r["sql_stagetune"], r["sql_bare"]
        print(f"  {r['backend']:<11} stagetune {st[0]:.1f} / {st[1]:.1f}   bare {bare[0]:.1f} / {bare[1]:.1f}")
    if args.cli_repeats:
        print()
        print(f"CLI end to end (stagetune optim ... run --objective quadratic, {n} trials, "
              f"median of {args.cli_repeats}):")
        for r in results:
            total, startup = r["cli"]
            print(f"  {r['backend']:<11} {total:.2f} s = {_ms(total, n):.1f} ms/trial incl. start-up; "
                  f"start-up + shut-down alone (budget met) {startup:.2f} s")


def profile(make_url: Callable[[str], str], backend: str, args: argparse.Namespace) -> None:
    url = make_url(backend)
    create_study(url, args.trials, args.pruner)
    profiler = cProfile.Profile()
    profiler.enable()
    run_stagetune(url, args.trials, 0)
    profiler.disable()
    profiler.dump_stats(args.profile)
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(r"stagetune/optim", 25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="sqlite", help="sqlite, postgresql, mysql, all, or a comma list")
    parser.add_argument("--trials", type=int, default=40, help="trials per run (default 40)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side (default 5)")
    parser.add_argument("--cli-repeats", type=int, default=3, help="CLI end-to-end runs (0: skip)")
    parser.add_argument("--sqlite-dir", type=Path, default=None,
                        help="where the SQLite files go (default: a temporary dir; /dev/shm takes fsync out)")
    parser.add_argument("--pruner", default="none", choices=sorted(PRUNERS),
                        help="the study's pruner, given to both sides (default none; stagetune's default is hyperband)")
    parser.add_argument("--profile", metavar="FILE", default=None,
                        help="instead: profile one stagetune run (first backend) into FILE (pstats)")
    args = parser.parse_args(argv)
    if args.trials < 1 or args.repeats < 1:
        parser.error("--trials and --repeats must be >= 1")
    backends = parse_backends(args.backend)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore")
    print(f"optim overhead: {', '.join(backends)}; {args.trials} trials/run; {os.cpu_count()} CPUs; "
          f"optuna {optuna.__version__}; load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    with databases(backends, args.sqlite_dir) as make_url:
        if args.profile:
            profile(make_url, backends[0], args)
            return 0
        for backend in backends:
            results.append(bench_backend(make_url, backend, args))
    report(results, args)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
