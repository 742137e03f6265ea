"""Load: a 10,000-trial study, and 64 workers against 100-connection servers (issue #9).

Part 1 (``--part big``): two studies over every tunable parameter of the default
config (a synthetic spec, as :mod:`optim_overhead` builds it; no data), one at
``--small`` trials (default 100) and one at ``--trials`` (default 10,000), each
in a fresh database of one throwaway server. Both are filled in bulk
(:func:`fill_bulk`: trials sampled by the quadratic objective on an in-memory
study, written into optuna's tables with multi-row INSERTs), or, with ``--fill
cli``, by the real CLI (``stagetune optim URL run --objective quadratic
--sampler random --workers --fill-workers``, the study's budget stopping it
exactly; 2-4 trials/s on a busy 2-core machine, so about an hour for 10,000). Then batches of ``--batch`` trials are run by
ONE in-process worker (:func:`stagetune.optim.worker.run_worker`, the code the
CLI runs: claim under the budget lock, sample the full space, write the
parameters, heartbeat, tell), alternating small and big study so that the
machine's load hits both alike; the median per-trial wall time of the batches
is compared (goal: big / small <= 2). Rows: the random sampler (orchestration
alone) and the study's default sampler (TPE, whose own cost grows with the
history; fewer and smaller batches). Also timed on both studies: what the
``train`` objective's "keep the best model dir" step reads per finished trial
(every COMPLETE trial, through the study), and the CLI's ``status``,
``important`` and ``best`` (wall seconds, interpreter start included, median of
``--repeats``, on both studies: the small one's time is mostly the fixed cost of
starting; goal < 2 s on the big study). ``important`` ranks its default sample
(``--max-trials``, 1000 of the big study's trials).

Part 2 (``--part workers``): a PostgreSQL and a MariaDB server started with
``max_connections`` = ``--max-connections`` (default 100), then one
``stagetune optim URL run --objective sleep --sleep-seconds S --workers W``
(the local pool forks W workers; default 64) on a study with a budget of
``--budget`` trials (default 192). Reported: wall, span (first trial start to
last completion, from the database), efficiency = ideal / wall and ideal /
span (ideal = budget x S / W), whether the budget was met exactly (finished
count and every state), and the lines of the workers' output that mention a
connection error (OperationalError, "too many connections", ...).

Run: ``.venv/bin/python bench/load.py`` (full; about 20-30 minutes on 2 cores),
``--quick`` for small sizes (about a minute). Results: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _servers import BACKENDS, databases  # noqa: E402
from optim_overhead import STUDY, synthetic_spec  # noqa: E402  (a synthetic spec: no data needed)

from stagetune.optim.storage import close_storage, open_storage  # noqa: E402
from stagetune.optim.study import init_study, read_spec  # noqa: E402
from stagetune.optim.worker import WorkerOptions, run_worker  # noqa: E402

#: Worker output that means a connection was refused or lost.
CONNECTION_ERRORS = re.compile(
    r"OperationalError|too many (clients|connections)|Too many connections|connection refused|"
    r"could not connect|remaining connection slots|server closed the connection|Lost connection",
    re.IGNORECASE,
)


def _stagetune() -> str:
    beside = Path(sys.executable).with_name("stagetune")
    return str(beside) if beside.exists() else (shutil.which("stagetune") or "stagetune")


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


@contextlib.contextmanager
def _storage(url: str) -> Iterator[object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = open_storage(url, heartbeat_interval=None, create=False)
    try:
        yield storage
    finally:
        close_storage(storage)


def make_study(url: str, num_trials: int, pruner: str = "hyperband") -> None:
    """Create the study (or set its budget): the default pruner, no sampler named (TPE)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = open_storage(url, heartbeat_interval=None)
    try:
        init_study(storage, STUDY, url, synthetic_spec(num_trials, pruner), force=True, log=lambda _m: None)
    finally:
        close_storage(storage)


def states(url: str) -> Counter[str]:
    with _storage(url) as storage:
        study = optuna.load_study(study_name=STUDY, storage=storage)
        return Counter(t.state.name for t in study.get_trials(deepcopy=False))


# --- Part 1: a big study ---------------------------------------------------------------


def fill_cli(url: str, trials: int, workers: int) -> float:
    """Run the study to its budget of ``trials`` with the real CLI; seconds taken."""
    make_study(url, trials)
    command = [_stagetune(), "optim", "--study-name", STUDY, url, "run", "--objective", "quadratic",
               "--sampler", "random", "--threads", "1", "--quiet", "--seed", "0"]
    if workers > 1:
        command += ["--workers", str(workers)]
    began = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"filling the study failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return seconds


def fill_bulk(url: str, trials: int, distinct: int = 1000) -> float:
    """Fill the study in bulk, in optuna's own tables; seconds taken.

    ``distinct`` trials are sampled and evaluated as the worker does (the study's
    spec, the quadratic objective, the random sampler) on an in-memory optuna
    study; the study gets ``trials`` COMPLETE trials cycling through them (the
    value raised by ``number x 1e-9``, so that no two tie for the best),
    written with three multi-row INSERTs (trials, their parameters, their values)
    into optuna's ``trials``, ``trial_params`` and ``trial_values`` tables
    through the storage's engine: no claim, heartbeat or budget lock, and
    minutes faster than optuna's ``create_new_trial`` per trial on a busy 2-core machine.
    """
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from sqlalchemy import select

    from stagetune.optim.objective import OBJECTIVES, TrialContext

    make_study(url, trials)
    began = time.perf_counter()
    with _storage(url) as storage:
        study = optuna.load_study(study_name=STUDY, storage=storage)
        memory = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        ctx = TrialContext(study=memory, spec=read_spec(storage, STUDY, url), device="cpu",
                           ckpt_dir=Path("/nonexistent"), log=lambda _m: None)
        objective = OBJECTIVES["quadratic"]
        for _ in range(min(distinct, trials)):
            trial = memory.ask()
            memory.tell(trial, objective(ctx, trial))
        templates = memory.get_trials(deepcopy=False)
        jsons = {name: distribution_to_json(d) for t in templates for name, d in t.distributions.items()}
        first = len(study.get_trials(deepcopy=False))
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        step = datetime.timedelta(milliseconds=50)
        with storage.engine.begin() as conn:
            conn.execute(models.TrialModel.__table__.insert(), [
                {"number": n, "study_id": study._study_id, "state": optuna.trial.TrialState.COMPLETE,
                 "datetime_start": now - (trials - n) * step, "datetime_complete": now - (trials - n - 1) * step}
                for n in range(first, trials)
            ])
            table = models.TrialModel.__table__
            ids = dict(conn.execute(select(table.c.number, table.c.trial_id).where(
                table.c.study_id == study._study_id, table.c.number >= first)).all())
            conn.execute(models.TrialParamModel.__table__.insert(), [
                {"trial_id": ids[n], "param_name": name, "distribution_json": jsons[name],
                 "param_value": t.distributions[name].to_internal_repr(value)}
                for n in range(first, trials) for t in [templates[n % len(templates)]]
                for name, value in t.params.items()
            ])
            conn.execute(models.TrialValueModel.__table__.insert(), [
                {"trial_id": ids[n], "objective": 0, "value": templates[n % len(templates)].value + n * 1e-9,
                 "value_type": models.TrialValueModel.TrialValueType.FINITE}
                for n in range(first, trials)
            ])
    return time.perf_counter() - began


def analyze(url: str) -> float:
    """Refresh the planner's statistics of optuna's trial tables; seconds taken.

    A study that grew to 10,000 trials over days has been analysed by the server's
    autovacuum (PostgreSQL) or statistics sampling (MariaDB) many times; one filled
    in bulk a second ago has not, and on PostgreSQL the first minute after the fill
    also has autovacuum vacuuming and analysing ~340,000 new rows on the same 2 cores.
    ``VACUUM ANALYZE`` does that work first; the CLI commands are timed on the
    settled study, as users meet it.
    """
    from sqlalchemy import text

    from stagetune.optim.optuna_internals import TRIAL_PARAMS, TRIAL_VALUES, TRIALS

    began = time.perf_counter()
    with _storage(url) as storage, storage.engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")  # VACUUM cannot run in a transaction
        name = conn.dialect.name
        if name == "mysql":
            conn.execute(text(f"ANALYZE TABLE {TRIALS}, {TRIAL_PARAMS}, {TRIAL_VALUES}"))
        else:  # PostgreSQL: the vacuum autovacuum would run after the insert, then the statistics
            verb = "VACUUM ANALYZE" if name == "postgresql" else "ANALYZE"
            for table in (TRIALS, TRIAL_PARAMS, TRIAL_VALUES):
                conn.execute(text(f"{verb} {table}"))
    return time.perf_counter() - began


def time_batch(url: str, n: int, sampler: str | None, seed: int) -> tuple[float, float, float]:
    """One in-process worker runs ``n`` more trials: (wall s per trial, cycle s, start+stop s).

    The budget is raised by ``n`` first (untimed), so the worker stops by it.
    ``cycle`` is the mean time from one trial's start to the next's in the
    database (claim, sample, write parameters, tell: the steady per-trial cost);
    ``start+stop`` is the rest of the wall time, ``wall - n x cycle`` (the
    worker loading the study and joining it, its last claim finding the budget met).
    """
    with _storage(url) as storage:
        before = storage.get_n_trials(storage.get_study_id_from_name(STUDY))
    make_study(url, before + n)
    began = datetime.datetime.now()
    wall = time.perf_counter()
    summary = run_worker(url, STUDY, WorkerOptions(sampler=sampler, seed=seed, objective="quadratic"),
                         log=lambda _m: None)
    wall = time.perf_counter() - wall
    if summary.counts["COMPLETE"] != n:
        raise SystemExit(f"a batch ran {dict(summary.counts)} instead of {n} complete trials")
    with _storage(url) as storage:  # the batch's trials only: reading all of them takes long at 10,000
        study_id = storage.get_study_id_from_name(STUDY)
        mine = [storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
                for number in range(before, before + n)]
    if any(t.datetime_start is None or t.datetime_start < began for t in mine):
        raise SystemExit("a batch's trials were not the ones its worker ran")
    starts = sorted(t.datetime_start for t in mine)
    cycle = (starts[-1] - starts[0]).total_seconds() / (n - 1) if n > 1 else \
        (mine[0].datetime_complete - starts[0]).total_seconds()
    return wall / n, cycle, wall - n * cycle


def time_keep_best_read(url: str, repeats: int) -> tuple[float, float]:
    """What ``_keep_if_best`` (train objective) reads per finished trial: every COMPLETE trial's
    number, value, reuse and retry in one query (``StagetuneStorage.completed_values``; until
    2026-11-28 optuna's full ``get_trials``, 24.5 s the first time at 10,000 trials).

    (first read in a fresh storage, median of the next ``repeats``).
    """
    times = []
    with _storage(url) as storage:
        study_id = storage.get_study_id_from_name(STUDY)
        for _ in range(repeats):
            t0 = time.perf_counter()
            storage.completed_values(study_id)
            times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:])


def time_cli(url: str, command: Sequence[str], repeats: int, out_dir: Path) -> tuple[float, list[str]]:
    """Median wall seconds of ``stagetune optim URL <command>``, and the distinct outputs' digests."""
    times, outputs = [], []
    for i in range(repeats):
        out = out_dir / f"{command[0]}-{i}.txt"
        argv = [_stagetune(), "optim", "--study-name", STUDY, url, *command]
        t0 = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if done.returncode != 0:
            raise SystemExit(f"`{' '.join(argv)}` failed ({done.returncode}):\n{done.stderr[-2000:]}")
        out.write_text(done.stdout)
        outputs.append(done.stdout)
    return statistics.median(times), outputs


@dataclass
class BigResult:
    backend: str
    small: int
    big: int
    fill: str
    fill_s: float
    rows: list[tuple[str, int, list[tuple[float, float, float]], list[tuple[float, float, float]]]] = field(
        default_factory=list)
    keep_read: tuple[tuple[float, float], ...] = ()
    cli: dict[str, tuple[float, float, bool]] = field(default_factory=dict)


def part_big(args: argparse.Namespace, make_url: Callable[[str], str], backend: str) -> BigResult:
    small_url, big_url = make_url(backend), make_url(backend)
    print(f"[big] filling a {args.small}-trial study ({args.fill})", flush=True)
    fill = fill_cli if args.fill == "cli" else (lambda u, n, _w: fill_bulk(u, n))
    fill(small_url, args.small, args.fill_workers)
    how = f"cli, {args.fill_workers} workers" if args.fill == "cli" else args.fill
    print(f"[big] filling a {args.trials}-trial study ({how}); "
          f"load {_load()}", flush=True)
    fill_s = fill(big_url, args.trials, args.fill_workers)
    result = BigResult(backend, args.small, args.trials, args.fill, fill_s)
    print(f"[big] filled {args.trials} trials in {fill_s:.0f} s ({1000 * fill_s / args.trials:.1f} ms per trial); "
          f"load {_load()}", flush=True)
    for label, sampler, n, batches in (("random", "random", args.batch, args.batches),
                                       ("tpe (study default)", None, args.tpe_batch, args.tpe_batches)):
        if batches <= 0 or n <= 0:
            continue
        got: dict[str, list[tuple[float, float, float]]] = {"small": [], "big": []}
        for b in range(batches):
            pair = (("small", small_url), ("big", big_url))
            for which, url in pair if b % 2 == 0 else pair[::-1]:
                got[which].append(time_batch(url, n, sampler, seed=1000 + b))
            print(f"[big] {label} batch {b + 1}/{batches} (wall, cycle ms per trial; start+stop s): "
                  f"small {_fmt(got['small'][-1])}, big {_fmt(got['big'][-1])}; load {_load()}", flush=True)
        result.rows.append((label, n, got["small"], got["big"]))
    result.keep_read = (time_keep_best_read(small_url, 6), time_keep_best_read(big_url, 6))
    if args.analyze:
        print(f"[big] tables analysed ({analyze(small_url) + analyze(big_url):.1f} s) before the CLI commands; "
              f"load {_load()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="stagetune-load-") as tmp:
        for name in args.commands:
            command = [name] if name == "status" else [name, "-"]
            seconds, outputs = time_cli(big_url, command, args.repeats, Path(tmp))
            small_seconds, _ = time_cli(small_url, command, args.repeats, Path(tmp))
            result.cli[name] = (seconds, small_seconds, len(set(outputs)) == 1)
            print(f"[big] {name}: median {seconds:.2f} s ({small_seconds:.2f} s at {args.small}); load {_load()}",
                  flush=True)
    return result


def _fmt(t: tuple[float, float, float]) -> str:
    return f"{1000 * t[0]:.1f}, {1000 * t[1]:.1f}; {t[2]:.2f}"


def report_big(r: BigResult) -> None:
    med = statistics.median
    print()
    print(f"Part 1, {r.backend}: studies at {r.small} and {r.big} trials (filled by "
          f"{'the CLI' if r.fill == 'cli' else 'bulk INSERTs into optuna tables'} in {r.fill_s:.0f} s)")
    header = (f"{'sampler':<20} {'batch':>5} {'cycle ms @small':>15} {'cycle ms @big':>13} {'ratio':>6} "
              f"{'wall ms @small':>14} {'wall ms @big':>12} {'ratio':>6} {'start+stop s':>12}")
    print(header)
    print("-" * len(header))
    for label, n, small, big in r.rows:
        ws, cs, ss = (med(t[i] for t in small) for i in range(3))
        wb, cb, sb = (med(t[i] for t in big) for i in range(3))
        print(f"{label:<20} {n:>5} {1000 * cs:>15.1f} {1000 * cb:>13.1f} {cb / cs:>6.2f} "
              f"{1000 * ws:>14.1f} {1000 * wb:>12.1f} {wb / ws:>6.2f} {ss:>5.2f} / {sb:<5.2f}")
    (small_first, small_next), (big_first, big_next) = r.keep_read
    print(f"keep-best read (all COMPLETE trials): first {1000 * small_first:.1f} ms, then {1000 * small_next:.1f} ms "
          f"@{r.small}; first {1000 * big_first:.1f} ms, then {1000 * big_next:.1f} ms @{r.big}")
    for name, (seconds, small_seconds, same) in r.cli.items():
        print(f"optim {name:<9} on {r.big} trials: {seconds:.2f} s (median; {small_seconds:.2f} s on {r.small})"
              f"{'' if same else ' (outputs differ)'}")


# --- Part 2: many workers --------------------------------------------------------------


@dataclass
class WorkersResult:
    backend: str
    workers: int
    budget: int
    seconds: float
    wall_s: float
    span_s: float
    trial_s: float
    states: Counter[str]
    exit_code: int
    errors: list[str]


def part_workers(url: str, backend: str, workers: int, budget: int, seconds: float) -> WorkersResult:
    make_study(url, budget, pruner="none")
    command = [_stagetune(), "optim", "--study-name", STUDY, url, "run", "--objective", "sleep",
               "--sleep-seconds", str(seconds), "--threads", "1", "--sampler", "random", "--quiet",
               "--workers", str(workers), "--seed", "0"]
    began = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - began
    errors = [line for line in done.stdout.splitlines() if CONNECTION_ERRORS.search(line)]
    if done.returncode != 0:
        print(f"  the pool exited {done.returncode}:\n{done.stdout[-3000:]}", file=sys.stderr)
    with _storage(url) as storage:
        frozen = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    finished = [t for t in frozen if t.datetime_complete is not None and t.datetime_start is not None]
    span = trial = float("nan")
    if finished:
        span = (max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)).total_seconds()
        trial = statistics.median((t.datetime_complete - t.datetime_start).total_seconds() for t in finished)
    return WorkersResult(backend, workers, budget, seconds, wall, span, trial,
                         Counter(t.state.name for t in frozen), done.returncode, errors)


def report_workers(results: list[WorkersResult]) -> None:
    print()
    header = (f"{'backend':<11} {'workers':>7} {'budget':>6} {'ideal s':>7} {'wall s':>7} {'eff wall':>8} "
              f"{'span s':>7} {'eff span':>8} {'trial s':>7} {'conn errors':>11}  finished (states)")
    print(header)
    print("-" * len(header))
    for r in results:
        ideal = r.budget * r.seconds / r.workers
        finished = r.states["COMPLETE"] + r.states["PRUNED"]
        exact = "exact" if finished == r.budget == sum(r.states.values()) else "NOT EXACT"
        others = ", ".join(f"{n} {s}" for s, n in sorted(r.states.items()))
        print(f"{r.backend:<11} {r.workers:>7} {r.budget:>6} {ideal:>7.1f} {r.wall_s:>7.1f} "
              f"{100 * ideal / r.wall_s:>7.0f}% {r.span_s:>7.1f} {100 * ideal / r.span_s:>7.0f}% {r.trial_s:>7.2f} "
              f"{len(r.errors):>11}  {finished}/{r.budget} {exact} ({others}); exit {r.exit_code}")
    for r in results:
        for line in r.errors[:5]:
            print(f"  {r.backend}: {line[:200]}")


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="big,workers", help="comma list: big (10,000 trials), workers (64)")
    parser.add_argument("--backends", default="postgresql,mysql",
                        help="big: the first of these; workers: each (comma list of sqlite, postgresql, mysql)")
    parser.add_argument("--trials", type=int, default=10_000, help="the big study's size (default 10000)")
    parser.add_argument("--small", type=int, default=100, help="the small study's size (default 100)")
    parser.add_argument("--fill", choices=("cli", "bulk"), default="bulk",
                        help="how the studies are filled: in bulk into optuna's tables (default; see "
                             "fill_bulk), or by the CLI (about 2-4 trials/s on a busy 2-core machine)")
    parser.add_argument("--fill-workers", type=int, default=2, help="--workers of the filling CLI (default 2)")
    parser.add_argument("--batch", type=int, default=50, help="trials per timed batch, random sampler")
    parser.add_argument("--batches", type=int, default=4, help="timed batches per study, random sampler")
    parser.add_argument("--tpe-batch", type=int, default=10, help="trials per timed batch, default sampler")
    parser.add_argument("--tpe-batches", type=int, default=2, help="timed batches per study, default sampler")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each CLI command timed")
    parser.add_argument("--commands", default="status,important,best",
                        help="the CLI commands timed on the big study (comma list; default status,important,best)")
    parser.add_argument("--no-analyze", dest="analyze", action="store_false",
                        help="time the CLI commands right after the bulk fill, without refreshing the tables' "
                             "statistics first (as runs before 2026-11-28 11:00 UTC did)")
    parser.add_argument("--workers", type=int, default=64, help="pool size of part 2 (default 64)")
    parser.add_argument("--budget", type=int, default=192, help="trials of part 2 (default 192)")
    parser.add_argument("--sleep-seconds", type=float, default=1.0, help="per trial in part 2 (default 1)")
    parser.add_argument("--max-connections", type=int, default=100, help="of the part-2 servers (default 100)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 300 vs 30 trials, 8 workers, budget 24, one run of each CLI command")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.small, args.batch, args.batches = 300, 30, 10, 2
        args.tpe_batch, args.tpe_batches, args.repeats = 3, 1, 1
        args.workers, args.budget, args.sleep_seconds = 8, 24, 0.5
    parts = {p.strip() for p in args.part.split(",") if p.strip()}
    args.commands = [c.strip() for c in args.commands.split(",") if c.strip()]
    if set(args.commands) - {"status", "important", "best"}:
        parser.error("--commands must list some of status, important, best")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not parts or parts - {"big", "workers"}:
        parser.error("--part must list big and/or workers")
    if not backends or set(backends) - set(BACKENDS):
        parser.error(f"--backends must list some of {', '.join(BACKENDS)}")
    if min(args.trials, args.small, args.fill_workers, args.repeats, args.workers, args.budget) < 1 \
            or args.small >= args.trials or args.sleep_seconds < 0 or args.max_connections < 2:
        parser.error("sizes must be positive, --small below --trials, --sleep-seconds >= 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    began = time.perf_counter()
    print(f"load bench {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: {' '.join(sys.argv)}\n"
          f"{os.cpu_count()} CPUs; optuna {optuna.__version__}; load average {_load()}", flush=True)
    ok = True
    if "big" in parts:
        with databases(backends[:1]) as make_url:
            big = part_big(args, make_url, backends[0])
        report_big(big)
        ok &= all(same for _, _, same in big.cli.values())
    if "workers" in parts:
        results = []
        server_backends = [b for b in backends if b != "sqlite"]
        with contextlib.ExitStack() as stack:
            make_server_url = stack.enter_context(databases(server_backends, max_connections=args.max_connections)) \
                if server_backends else None
            make_sqlite_url = stack.enter_context(databases(["sqlite"])) if "sqlite" in backends else None
            for backend in backends:
                url = (make_sqlite_url if backend == "sqlite" else make_server_url)(backend)
                print(f"[workers] {backend}: {args.workers} workers, budget {args.budget}, "
                      f"{args.sleep_seconds:g} s per trial; load {_load()}", flush=True)
                r = part_workers(url, backend, args.workers, args.budget, args.sleep_seconds)
                print(f"[workers] {backend}: {r.wall_s:.1f} s wall; load {_load()}", flush=True)
                results.append(r)
        report_workers(results)
        ok &= all(r.exit_code == 0 and not r.errors and r.states["COMPLETE"] + r.states["PRUNED"] == r.budget
                  == sum(r.states.values()) for r in results)
    print(f"total {time.perf_counter() - began:.0f} s; load average at the end {_load()}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
