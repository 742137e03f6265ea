"""An ``optim run`` worker: claim a trial slot, run the objective, report, repeat.

Preemption safety (the claim protocol itself is :mod:`stagetune.optim.claim`):

* every running trial sends a heartbeat; a worker that dies (kill -9, node
  loss) leaves a stale trial that the next worker to claim a slot fails and
  re-queues with the same parameters (``RetryHeartbeatStaleTrialCallback``);
  the retry resumes from the original trial's last epoch checkpoint;
* a worker whose trial was taken from it that way (it could not beat for the
  grace period) stops that trial in one line, without writing to its checkpoint
  dir or reporting it, and goes on;
* SIGTERM/SIGINT checkpoint the running trial, hand it back for immediate
  retry, and end the worker; ``optim run`` then exits with the shell's status
  for the signal (130 for SIGINT, 143 for SIGTERM), so ``run && next`` stops;
* the database away (down, restarting, hung) is waited out for as long as it
  takes, with one line when the wait starts and one when it ends (and one per
  ``STAGETUNE_DB_RETRY_S``, default 120 s, while it lasts): training goes on,
  and the trial is reported when the database is back, never lost;
* a trial that fails for an infrastructure reason (a database error, a full
  disk or another OS error writing its checkpoint) is handed back for a retry
  on another worker, and this worker stops; a trial that fails for a model
  reason (a bad config) stays FAIL.

A training worker checks first that its node has the device the trials train
on (:func:`check_device`): on a wrong node every trial would fail.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
import sqlalchemy.exc
from optuna.trial import TrialState

from stagetune.errors import StagetuneError, StorageError, TrainingInterrupted, TrialLost, UsageError
from stagetune.optim.budget import FINISHED_STATES, count_trials, trial_state
from stagetune.optim.claim import Claims, HeartbeatRule
from stagetune.optim.objective import OBJECTIVES, DbCall, TrialContext
from stagetune.optim.optuna_internals import DbState, study_id_of, tell_with_warning, trial_id_of
from stagetune.optim.rdb import STALE_ATTR, StagetuneStorage
from stagetune.optim.registry import SAMPLERS, make_sampler
from stagetune.optim.report import WORKER_ATTR
from stagetune.optim.storage import close_storage, is_transient_db_error, mask_url, open_storage, retry_transient
from stagetune.optim.study import load_study

__all__ = ["WorkerOptions", "WorkerSummary", "run_worker", "check_device"]

#: Consecutive failed trials after which a worker gives up (a systematic error).
MAX_CONSECUTIVE_FAILURES = 3


@dataclass
class WorkerOptions:
    """How one worker runs."""

    #: A key of SAMPLERS; None: the study's own (its ``optim init --sampler``).
    sampler: str | None = None
    n_trials: int | None = None
    timeout: float | None = None
    ckpt_dir: Path = Path("stagetune-ckpt")
    max_retries: int = 3
    seed: int | None = None
    objective: str = "train"
    #: None for both: the study's heartbeat rule (see :mod:`stagetune.optim.claim`);
    #: given and different from it, the study's still applies (with a warning).
    heartbeat_interval: int | None = None
    grace_period: int | None = None
    device: str | None = None
    num_data_workers: int | None = None
    keep_models: bool = False
    sleep_seconds: float = 1.0
    verbose: bool = False
    #: Write each trial's epochs to DIR/STUDY/trial-N for TensorBoard (``optim run --tensorboard``).
    tensorboard: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON data (a path as its ``os.fspath`` string: a JSON round trip keeps odd bytes)."""
        return {k: os.fspath(v) if isinstance(v, Path) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerOptions:
        """The options :meth:`to_dict` wrote.

        Raises:
            TypeError: ``data`` names a field these options do not have.
        """
        paths = {name for name, f in cls.__dataclass_fields__.items() if "Path" in str(f.type)}
        return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in data.items()})


@dataclass
class WorkerSummary:
    """What one worker did."""

    counts: dict[str, int] = field(default_factory=lambda: {s: 0 for s in ("COMPLETE", "PRUNED", "FAIL", "HANDED_BACK")})
    stop_reason: str = ""
    best: tuple[int, float] | None = None
    #: The signal (SIGTERM, SIGINT) that stopped the worker; None when it stopped on its own.
    signum: int | None = None

    def exit_code(self) -> int:
        """The shell's status: 128 + the signal that stopped the worker, else 0."""
        return 0 if self.signum is None else 128 + self.signum

    def count(self, what: str) -> None:
        """One more trial that ended so (a kind beyond the usual four is listed once it happens)."""
        self.counts[what] = self.counts.get(what, 0) + 1

    def line(self) -> str:
        parts = ", ".join(f"{v} {k.lower().replace('_', ' ')}" for k, v in self.counts.items())
        return f"worker done ({self.stop_reason}): {parts}"

    def to_dict(self) -> dict[str, Any]:
        """JSON data (``best`` as a [number, value] pair)."""
        return {
            "counts": dict(self.counts),
            "stop_reason": self.stop_reason,
            "best": list(self.best) if self.best is not None else None,
            "signum": self.signum,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerSummary:
        """The summary :meth:`to_dict` wrote."""
        best = data["best"]
        return cls(
            counts={str(k): int(v) for k, v in data["counts"].items()},
            stop_reason=data["stop_reason"],
            best=(int(best[0]), float(best[1])) if best is not None else None,
            signum=data["signum"],
        )


class _Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds in a daemon thread.

    The first beat is recorded by the claim itself, under the budget lock (see
    :meth:`Claims.claim`), so the thread waits one interval first. Each beat also
    reads the trial's state: a trial no longer RUNNING was taken over by another
    worker (:attr:`lost`). While the database is away the thread tries every second,
    so the first beat after an outage comes early.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float) -> None:
        self._db, self._beat_trial, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stagetune-heartbeat")

    def _run(self) -> None:
        wait = self._interval
        while not self._stop.wait(wait):
            try:
                self._db.record_heartbeat(self._beat_trial)
                state = trial_state(self._db, self._beat_trial)
            except Exception:  # an outage: the next beat may get through
                wait = min(self._interval, 1.0)
                continue
            wait = self._interval
            if state != TrialState.RUNNING.name:
                self.lost.set()
                return

    def still_owner(self, confirm: bool = False) -> bool:
        """Whether the trial is still this worker's.

        Args:
            confirm: Ask the database (before writing to the trial's checkpoint dir).
                While it is unreachable the answer is yes: nobody can take the trial
                over meanwhile (a stale trial must be seen not beating by the database).
        """
        if self.lost.is_set():
            return False
        if not confirm:
            return True
        try:
            state = trial_state(self._db, self._beat_trial)
        except Exception as exc:
            if is_transient_db_error(exc):
                return True
            raise
        if state != TrialState.RUNNING.name:
            self.lost.set()
            return False
        return True

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        # Not waited for long: a beat stuck on a hung database must not hold up the
        # report (which waits for the database itself, and says so).
        self._stop.set()
        self._thread.join(timeout=0.5)


class _ResilientTrial:
    """A trial whose database calls wait out a transient outage (see retry_transient)."""

    _RETRIED = ("suggest_int", "suggest_float", "suggest_categorical", "report", "should_prune", "set_user_attr")

    def __init__(self, trial: optuna.Trial, db: DbCall) -> None:
        self._trial, self._db = trial, db

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._trial, name)
        if name not in self._RETRIED:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._db(lambda: attr(*args, **kwargs), f"trial {self._trial.number}: {name}")

        return call


def _compact(params: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(f"{k.split('.', 1)[1]}={fmt(v)}" for k, v in params.items())


def check_device(study_name: str, spec_device: str | None, override: str | None) -> None:
    """Refuse to train on a node without the device the study's trials train on.

    Checked before a trial is claimed: on such a node every trial would fail, and
    the worker would store failed trials before it stopped. ``torch.cuda.device_count``
    asks NVML where it can, which leaves CUDA uninitialised: the worker pool calls
    this before it forks.

    Args:
        study_name: For the message.
        spec_device: The study's device (``optim init --device``); None: cuda if available.
        override: The worker's ``--device``, which replaces the study's.

    Raises:
        UsageError: ``override`` is no torch device, or names CUDA where there is none.
        StagetuneError: The study's device is CUDA, and this node has none.
    """
    name = override if override is not None else spec_device
    if name is None:  # cuda where available, else cpu: any node will do
        return
    import torch

    what = f"--device {name}" if override is not None else (
        f"study {study_name!r} trains on {name} (its optim init --device)"
    )
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"{what}: {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type != "cuda":
        return
    count = torch.cuda.device_count()
    if count > (device.index or 0):
        return
    seen = f"only {count} CUDA device{'s are' if count > 1 else ' is'} visible" if count else "no CUDA device is visible"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        seen += f" (CUDA_VISIBLE_DEVICES={visible})"
    if override is not None:
        raise UsageError(f"{what}: {seen} here; use --device cpu, or a device this node has")
    raise StagetuneError(
        f"{what}, but {seen} on this node; run the worker on a node that has it, "
        f"or train on the CPU with `stagetune --device cpu optim ... run`"
    )


def run_worker(
    url: str,
    study_name: str,
    options: WorkerOptions,
    *,
    log: Callable[[str], None] = print,
) -> WorkerSummary:
    """Pull trials from the study until its budget, ``n_trials`` or ``timeout`` is reached."""
    if options.objective not in OBJECTIVES:
        raise StagetuneError(f"unknown objective {options.objective!r}; choose from {', '.join(sorted(OBJECTIVES))}")
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    given = None
    if options.heartbeat_interval is not None or options.grace_period is not None:
        given = HeartbeatRule.of(options.heartbeat_interval, options.grace_period)
    rule = given or HeartbeatRule.of(None, None)
    storage = open_storage(
        url,
        heartbeat_interval=rule.interval,  # the study's rule replaces these once it is read
        grace_period=rule.grace_period,
        create=False,  # a worker joins a study that init created; it never creates a database
    )
    try:
        return _Worker(storage, url, study_name, options, given, log).run()
    finally:
        close_storage(storage)


#: Messages of torch's serialisation failing on a full or broken disk (a RuntimeError).
_DISK_FAILURES = ("inline_container", "unexpected pos", "file write failed", "no space left on device")


def infrastructure_failure(exc: BaseException) -> bool:
    """Whether a trial failed for its machine's sake, not its model's.

    Database errors and OS errors (a full disk, a broken mount, a checkpoint dir that
    cannot be written), also when wrapped; torch's serialisation errors on a full
    disk. Such a trial deserves a retry elsewhere; a model's error (a bad config) does not.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, (OSError, StorageError, sqlalchemy.exc.SQLAlchemyError,
                              optuna.exceptions.StorageInternalError)):
            return True
        if isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _DISK_FAILURES):
            return True
        todo += [error.__cause__, error.__context__]
    return False


class _Worker:
    """One ``optim run`` worker: claim, run, report, until the budget is met or it is stopped."""

    def __init__(
        self,
        storage: StagetuneStorage,
        url: str,
        study_name: str,
        options: WorkerOptions,
        given: HeartbeatRule | None,
        log: Callable[[str], None],
    ) -> None:
        self.storage, self.url, self.study_name, self.options, self.given, self.log = (
            storage, url, study_name, options, given, log
        )
        self.signum: int | None = None
        self.summary = WorkerSummary()
        #: Stored in each trial it runs (:data:`WORKER_ATTR`), for the report's timeline.
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    # The database, waited for as long as it takes: a SIGTERM/SIGINT ends the wait.

    def db(self, fn: Callable[[], Any], what: str) -> Any:
        return retry_transient(
            fn, what=what, url=self.url, log=self.log, max_wait_s=None, give_up=self._signal_name
        )

    def _signal_name(self) -> str | None:
        return None if self.signum is None else f"{signal.Signals(self.signum).name} received"

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is None:  # the first one decides the exit status
            self.signum = signum

    def run(self) -> WorkerSummary:
        options, log = self.options, self.log
        study, spec = load_study(self.storage, self.study_name, self.url)
        sampler = options.sampler or spec.sampler_name()
        if sampler not in SAMPLERS:
            raise StagetuneError(
                f"study {self.study_name!r} samples with {sampler!r}, which this stagetune does not know "
                f"(it knows {', '.join(sorted(SAMPLERS))}); give optim run --sampler"
            )
        study.sampler = make_sampler(sampler, options.seed)
        if options.objective == "train":
            check_device(self.study_name, spec.device, options.device)
        self.study, self.spec = study, spec
        self.claims = Claims(self.storage, study, spec, self.given, options.max_retries, log)
        warning = self.db(self.claims.join, "joining the study")
        if warning is not None:
            log(f"stagetune: warning: {warning}")
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
        log(
            f"worker {os.getpid()} on study {self.study_name} in {mask_url(self.url)}: objective {options.objective}"
            + (f" (metric {spec.metric})" if options.objective == "train" else "")
            + f", sampler {sampler}" + (f", CUDA_VISIBLE_DEVICES={gpu}" if gpu is not None else "")
        )
        self.ctx = self._context()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._loop()
        except StorageError:
            if self.signum is None:
                raise
            self._stopped_by_signal()  # a signal ended a wait for the database
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return self.summary

    def _context(self) -> TrialContext:
        options, spec, storage = self.options, self.spec, self.storage
        ctx = TrialContext(
            study=self.study,
            spec=spec,
            device=options.device,
            ckpt_dir=Path(options.ckpt_dir) / self.study_name,
            num_data_workers=spec.num_data_workers if options.num_data_workers is None else options.num_data_workers,
            keep_models=options.keep_models,
            sleep_seconds=options.sleep_seconds,
            log=self.log if options.verbose else (lambda _m: None),
            db=self.db,
            completed=lambda: storage.completed_values(study_id_of(self.study)),
            batch_params=lambda trial: storage.batched_params(
                trial_id_of(trial), write=lambda flush: self.db(flush, f"trial {trial.number}: writing its parameters")
            ),
        )
        ctx.stop_signal = lambda: self.signum
        if options.tensorboard is not None:  # per-epoch scalars, the trial's parameters as hparams
            from stagetune.optim.metrics import METRICS
            from stagetune.optim.tensorboard import EpochWriter

            board, metric = Path(options.tensorboard) / self.study_name, METRICS[spec.metric]
            ctx.epoch_callbacks = lambda trial, run: [
                EpochWriter(board / run, trial.params, lambda r: metric.value(r.dev_error, r.dev_loss))
            ]
        if options.objective == "train":
            from stagetune.corpus import load_corpus

            ctx.corpus = load_corpus(
                spec.train_dir, spec.dev_dir, dev_proportion=spec.dev_proportion, task=ctx.base.model.task
            )
        return ctx

    def _stopped_by_signal(self) -> None:
        self.summary.stop_reason = f"{signal.Signals(self.signum).name} received"
        self.summary.signum = self.signum

    def _loop(self) -> None:
        options, spec, summary = self.options, self.spec, self.summary
        study_id = self.claims.study_id
        started = time.monotonic()
        consecutive_failures = 0
        num_started = 0
        while True:
            if self.signum is not None:
                self._stopped_by_signal()
                return
            if options.n_trials is not None and num_started >= options.n_trials:
                summary.stop_reason = f"--n-trials {options.n_trials} reached"
                return
            if options.timeout is not None and time.monotonic() - started >= options.timeout:
                summary.stop_reason = f"--timeout {options.timeout:g} s reached"
                return
            trial = self.db(self.claims.claim, "claiming a trial")
            if trial is None:
                finished = self.db(lambda: count_trials(self.storage, study_id, FINISHED_STATES), "counting trials")
                if finished >= spec.num_trials:
                    summary.stop_reason = f"budget of {spec.num_trials} trials met"
                    return
                # A RUNNING trial that missed heartbeats may belong to a dead worker: wait
                # for it to be failed and re-queued rather than leave its slot unused.
                if self.claims.suspects():
                    time.sleep(min(self.claims.rule.interval, 5))
                    continue
                running = self.db(lambda: count_trials(self.storage, study_id, (DbState.RUNNING,)), "counting trials")
                summary.stop_reason = (
                    f"every remaining slot of the {spec.num_trials}-trial budget is claimed "
                    f"({running} {'trial' if running == 1 else 'trials'} running in other workers)"
                )
                return
            num_started += 1
            outcome = self._run_one(trial)
            if outcome == "handed_back":
                self._stopped_by_signal()
                return
            consecutive_failures = consecutive_failures + 1 if outcome == "FAIL" else 0
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise StagetuneError(
                    f"{consecutive_failures} trials in a row failed; stopping this worker "
                    f"(see the messages above and the trials' fail_reason attribute)"
                )

    def _run_one(self, trial: optuna.Trial) -> str:
        ctx = self.ctx
        objective = OBJECTIVES[self.options.objective]
        began = time.monotonic()
        value: float | None = None
        reason = ""
        state: TrialState | str | None
        heartbeat = _Heartbeat(self.storage, trial_id_of(trial), self.claims.rule.interval)
        ctx.still_owner = heartbeat.still_owner
        with heartbeat:  # from the claim on: waits for the database (below) are beaten through
            try:
                self.db(lambda: trial.set_user_attr(WORKER_ATTR, self.name), f"trial {trial.number}: naming its worker")
                value = objective(ctx, _ResilientTrial(trial, self.db))
                state = TrialState.COMPLETE
            except optuna.TrialPruned as exc:
                state, reason = TrialState.PRUNED, str(exc)
            except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
                state = "lost"
            except (TrainingInterrupted, KeyboardInterrupt) as exc:
                self.signum = exc.signum if isinstance(exc, TrainingInterrupted) else signal.SIGINT
                state = None
            except StorageError:
                if self.signum is None:
                    raise
                state = "abandoned"  # a signal ended a wait for the database
            except Exception as exc:  # a failed trial must not take the worker down
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                state = "infrastructure" if infrastructure_failure(exc) else TrialState.FAIL
            # Still beating: a report that waits for the database must not look like a dead worker.
            return self._settle(trial, state, value, reason, time.monotonic() - began, heartbeat)

    def _settle(
        self,
        trial: optuna.Trial,
        state: TrialState | str | None,
        value: float | None,
        reason: str,
        seconds: float,
        heartbeat: _Heartbeat,
    ) -> str:
        """Report the trial's end (or hand it back); what :meth:`_loop` needs to know of it."""
        summary, log = self.summary, self.log
        if state not in ("lost", "abandoned") and not heartbeat.still_owner(confirm=True):
            state = "lost"  # taken over at the very end: its retry reports it
        if state == "lost":
            return self._lost(trial, seconds)
        if state == "abandoned":
            log(
                f"trial {trial.number} left RUNNING: the database was unreachable when this worker was "
                f"stopped; its retry starts once its heartbeat is stale (checkpoint kept)"
            )
            return "handed_back"
        if state is None:
            self.db(lambda: self.claims.give_back(trial_id_of(trial)), f"handing back trial {trial.number}")
            summary.count("HANDED_BACK")
            log(f"trial {trial.number} handed back for retry after {seconds:.1f} s (checkpoint kept)")
            return "handed_back"
        if state == "infrastructure":
            self.db(lambda: trial.set_user_attr("fail_reason", reason[:500]), f"trial {trial.number}: storing why it failed")
            self.db(lambda: self.claims.give_back(trial_id_of(trial)), f"handing back trial {trial.number}")
            summary.count("HANDED_BACK")
            raise StagetuneError(
                f"trial {trial.number} failed on this worker for an infrastructure reason ({reason}); "
                f"handed back for retry on another worker, and this worker stops (check its disk, "
                f"--ckpt-dir and database)"
            )
        if state == TrialState.FAIL:
            self.db(
                lambda: trial.set_user_attr("fail_reason", reason[:500]),
                f"trial {trial.number}: storing why it failed",
            )
        # optuna's own tell (as study.optimize uses it): the public one reads the trial back
        # for a deep copy that is not needed here.
        try:
            if state == TrialState.COMPLETE:
                self.db(lambda: tell_with_warning(self.study, trial, value), f"reporting trial {trial.number}")
            else:
                self.db(lambda: tell_with_warning(self.study, trial, state=state), f"reporting trial {trial.number}")
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
            if isinstance(exc, ValueError) and not str(exc).startswith("Cannot tell a"):
                raise
            if not self._report_landed(trial, state, value):
                return self._lost(trial, seconds)
        summary.count(state.name)
        if state == TrialState.COMPLETE and (summary.best is None or value < summary.best[1]):
            summary.best = (trial.number, value)
        epoch = trial.user_attrs.get("epoch") if hasattr(trial, "user_attrs") else None
        value_epoch = trial.user_attrs.get("value_epoch") if epoch else None  # the epoch the value came from
        detail = f"value {value:.4g}" if value is not None else reason
        log(
            f"trial {trial.number} {state.name} {detail}"
            + (f" (epoch {value_epoch} of {epoch})" if value_epoch else f" (epoch {epoch})" if epoch else "")
            + f" in {seconds:.1f} s | {_compact(trial.params)}"
        )
        return state.name

    def _report_landed(self, trial: optuna.Trial, state: TrialState, value: float | None) -> bool:
        """Whether the trial is finished as this worker reported it: a report whose COMMIT the
        server ran after the client had given up on it (a hung server), retried into
        "already finished". A trial failed as stale, or finished otherwise, was taken over."""
        frozen = self.db(lambda: self.storage.get_trial(trial_id_of(trial)), f"reading trial {trial.number}")
        if frozen.state != state or STALE_ATTR in frozen.system_attrs:
            return False
        return state != TrialState.COMPLETE or frozen.value == value

    def _lost(self, trial: optuna.Trial, seconds: float) -> str:
        self.summary.count("LOST")
        self.log(
            f"trial {trial.number} was taken over by another worker (declared stale: no heartbeat of "
            f"this worker reached the database for {self.claims.rule.grace_period} s); stopped it "
            f"after {seconds:.1f} s without writing its checkpoint dir or reporting it"
        )
        return "lost"
