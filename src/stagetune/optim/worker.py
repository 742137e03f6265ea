"""An ``optim run`` worker: claim a trial slot, run the objective, report, repeat.

Preemption safety:

* every running trial sends a heartbeat; a worker that dies (kill -9, node
  loss) leaves a stale trial that the next worker to claim a slot fails and
  re-queues with the same parameters (``RetryHeartbeatStaleTrialCallback``);
  the retry resumes from the original trial's last epoch checkpoint;
* SIGTERM/SIGINT checkpoint the running trial, hand it back for immediate
  retry, and end the worker; ``optim run`` then exits with the shell's status
  for the signal (130 for SIGINT, 143 for SIGTERM), so ``run && next`` stops.

A training worker checks first that its node has the device the trials train
on (:func:`check_device`): on a wrong node every trial would fail.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.study._tell import _tell_with_warning
from optuna.trial import TrialState

from stagetune.errors import StagetuneError, TrainingInterrupted, UsageError
from stagetune.optim.budget import (
    FINISHED_STATES,
    SLOT_STATES,
    budget_lock,
    count_by_state,
    count_trials,
    heartbeat_ages,
    orphaned_trials,
)
from stagetune.optim.objective import OBJECTIVES, DbCall, TrialContext
from stagetune.optim.rdb import StagetuneStorage
from stagetune.optim.registry import SAMPLERS, make_sampler
from stagetune.optim.storage import close_storage, mask_url, open_storage, retry_transient
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
    heartbeat_interval: int = 30
    grace_period: int | None = None
    device: str | None = None
    num_data_workers: int | None = None
    keep_models: bool = False
    sleep_seconds: float = 1.0
    verbose: bool = False


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

    def line(self) -> str:
        parts = ", ".join(f"{v} {k.lower().replace('_', ' ')}" for k, v in self.counts.items())
        return f"worker done ({self.stop_reason}): {parts}"


class _Heartbeat:
    """Records a trial's heartbeat every ``interval`` seconds in a daemon thread.

    The first beat is recorded by the claim itself, under the budget lock (see
    ``claim`` in :func:`run_worker`), so the thread waits one interval first.
    """

    def __init__(self, storage: optuna.storages.RDBStorage, trial_id: int, interval: float) -> None:
        self._storage, self._trial_id, self._interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stagetune-heartbeat")

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._storage.record_heartbeat(self._trial_id)
            except Exception:  # an outage: the next beat may get through
                pass

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


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


def _requeue(
    storage: StagetuneStorage,
    study: optuna.Study,
    retry: optuna.storages.RetryHeartbeatStaleTrialCallback,
    trial_id: int,
) -> None:
    """Fail a trial and queue a retry with its parameters (call under the budget lock).

    FAIL first: cut off in between, the retry is lost but the slot is freed; the
    other order could leave the trial running beside its retry, counted twice.
    """
    storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    retry(study, storage.get_trial(trial_id))


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
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
        max_retry=options.max_retries, inherit_intermediate_values=True
    )
    storage = open_storage(
        url,
        heartbeat_interval=options.heartbeat_interval,
        grace_period=options.grace_period,
        heartbeat_stale_trial_callback=retry,
        create=False,  # a worker joins a study that init created; it never creates a database
    )
    try:
        return _work(storage, url, study_name, options, retry, log)
    finally:
        close_storage(storage)


def _work(
    storage: StagetuneStorage,
    url: str,
    study_name: str,
    options: WorkerOptions,
    retry: optuna.storages.RetryHeartbeatStaleTrialCallback,
    log: Callable[[str], None],
) -> WorkerSummary:
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    study, spec = load_study(storage, study_name, url)
    sampler = options.sampler or spec.sampler_name()
    if sampler not in SAMPLERS:
        raise StagetuneError(
            f"study {study_name!r} samples with {sampler!r}, which this stagetune does not know "
            f"(it knows {', '.join(sorted(SAMPLERS))}); give optim run --sampler"
        )
    study.sampler = make_sampler(sampler, options.seed)
    if options.objective == "train":
        check_device(study_name, spec.device, options.device)
    study_id = study._study_id
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    log(
        f"worker {os.getpid()} on study {study_name} in {mask_url(url)}: objective {options.objective}"
        + (f" (metric {spec.metric})" if options.objective == "train" else "")
        + f", sampler {sampler}" + (f", CUDA_VISIBLE_DEVICES={gpu}" if gpu is not None else "")
    )

    def db(fn: Callable[[], Any], what: str) -> Any:
        return retry_transient(fn, what=what, url=url, log=log)

    ctx = TrialContext(
        study=study,
        spec=spec,
        device=options.device,
        ckpt_dir=Path(options.ckpt_dir) / study_name,
        num_data_workers=spec.num_data_workers if options.num_data_workers is None else options.num_data_workers,
        keep_models=options.keep_models,
        sleep_seconds=options.sleep_seconds,
        log=log if options.verbose else (lambda _m: None),
        db=db,
        batch_params=lambda trial: storage.batched_params(
            trial._trial_id, write=lambda flush: db(flush, f"trial {trial.number}: writing its parameters")
        ),
    )
    if options.objective == "train":
        from stagetune.corpus import load_corpus

        ctx.corpus = load_corpus(
            spec.train_dir, spec.dev_dir, dev_proportion=spec.dev_proportion, task=ctx.base.model.task
        )

    stop: dict[str, int | None] = {"signal": None}

    def on_signal(signum: int, frame: Any) -> None:
        if stop["signal"] is None:  # the first one decides the exit status
            stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    ctx.stop_signal = lambda: stop["signal"]
    summary = WorkerSummary()
    started = time.monotonic()
    consecutive_failures = 0
    num_started = 0

    # A trial turns stale only after missing beats for the grace period, so looking for
    # stale trials once per heartbeat interval (or grace period, if shorter) finds them
    # about as early as every claim would; a full budget always looks first, as a stale
    # trial may hold the slot.
    stale_check_every = min(options.heartbeat_interval, options.grace_period or options.heartbeat_interval)
    next_stale_check = [0.0]

    def fail_stale() -> None:
        optuna.storages.fail_stale_trials(study)
        next_stale_check[0] = time.monotonic() + stale_check_every

    def budget_full(counts: dict[str, int]) -> bool:
        slots = sum(counts.get(s, 0) for s in SLOT_STATES)
        return slots >= spec.num_trials and counts.get("WAITING", 0) == 0

    def claim() -> optuna.Trial | None:
        # Everything here runs on the connection that holds the lock: no second one is opened.
        # A claim creates the trial and records its first heartbeat before it lets go of
        # the lock, so a RUNNING trial without a heartbeat, seen under the lock, is what a
        # claim cut off in between left behind (an outage, kill -9): it is failed and
        # re-queued, or its slot would stay taken for good.
        with budget_lock(storage, study_name) as lock_conn, storage.sessions_on(lock_conn):
            checked = time.monotonic() >= next_stale_check[0]
            if checked:
                fail_stale()
            for number, trial_id in orphaned_trials(storage, study_id, lock_conn).items():
                _requeue(storage, study, retry, trial_id)
                log(f"trial {number} was claimed but never started (its claim was cut off); re-queued")
            if spec.num_trials is not None:
                counts = count_by_state(storage, study_id, lock_conn)
                if budget_full(counts) and not checked:
                    fail_stale()
                    counts = count_by_state(storage, study_id, lock_conn)
                if budget_full(counts):
                    return None
            trial = study.ask()
            storage.record_heartbeat(trial._trial_id)
            return trial

    try:
        while True:
            if stop["signal"] is not None:
                summary.stop_reason = f"{signal.Signals(stop['signal']).name} received"
                summary.signum = stop["signal"]
                break
            if options.n_trials is not None and num_started >= options.n_trials:
                summary.stop_reason = f"--n-trials {options.n_trials} reached"
                break
            if options.timeout is not None and time.monotonic() - started >= options.timeout:
                summary.stop_reason = f"--timeout {options.timeout:g} s reached"
                break
            trial = db(claim, "claiming a trial")
            if trial is None:
                finished = db(lambda: count_trials(storage, study_id, FINISHED_STATES), "counting trials")
                if finished >= spec.num_trials:
                    summary.stop_reason = f"budget of {spec.num_trials} trials met"
                    break
                running = db(lambda: count_trials(storage, study_id, ("RUNNING",)), "counting trials")
                # A RUNNING trial that missed heartbeats may belong to a dead worker: wait
                # for it to be failed and re-queued rather than leave its slot unused.
                ages = db(lambda: heartbeat_ages(storage, study_id), "reading heartbeats")
                if any(age > 2 * options.heartbeat_interval for age in ages.values()):
                    time.sleep(min(options.heartbeat_interval, 5))
                    continue
                summary.stop_reason = (
                    f"every remaining slot of the {spec.num_trials}-trial budget is claimed "
                    f"({running} {'trial' if running == 1 else 'trials'} running in other workers)"
                )
                break
            num_started += 1
            outcome = _run_one(storage, study, trial, ctx, options, retry, summary, log, stop, db)
            if outcome == "handed_back":
                summary.stop_reason = f"{signal.Signals(stop['signal']).name} received"
                summary.signum = stop["signal"]
                break
            consecutive_failures = consecutive_failures + 1 if outcome == "FAIL" else 0
            if consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
                raise StagetuneError(
                    f"{consecutive_failures} trials in a row failed; stopping this worker "
                    f"(see the messages above and the trials' fail_reason attribute)"
                )
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return summary


def _run_one(
    storage: optuna.storages.RDBStorage,
    study: optuna.Study,
    trial: optuna.Trial,
    ctx: TrialContext,
    options: WorkerOptions,
    retry: optuna.storages.RetryHeartbeatStaleTrialCallback,
    summary: WorkerSummary,
    log: Callable[[str], None],
    stop: dict[str, int | None],
    db: DbCall,
) -> str:
    objective = OBJECTIVES[options.objective]
    began = time.monotonic()
    value: float | None = None
    reason = ""
    with _Heartbeat(storage, trial._trial_id, options.heartbeat_interval):
        try:
            value = objective(ctx, _ResilientTrial(trial, db))
            state = TrialState.COMPLETE
        except optuna.TrialPruned as exc:
            state, reason = TrialState.PRUNED, str(exc)
        except (TrainingInterrupted, KeyboardInterrupt) as exc:
            if isinstance(exc, TrainingInterrupted):
                stop["signal"] = exc.signum
            else:
                stop["signal"] = signal.SIGINT
            state = None
        except Exception as exc:  # a failed trial must not take the worker down
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            db(
                lambda: trial.set_user_attr("fail_reason", reason[:500]),
                f"trial {trial.number}: storing why it failed",
            )
            state = TrialState.FAIL
    seconds = time.monotonic() - began
    if state is None:
        def hand_back() -> None:
            with budget_lock(storage, study.study_name) as lock_conn, storage.sessions_on(lock_conn):
                _requeue(storage, study, retry, trial._trial_id)

        db(hand_back, f"handing back trial {trial.number}")
        summary.counts["HANDED_BACK"] += 1
        log(f"trial {trial.number} handed back for retry after {seconds:.1f} s (checkpoint kept)")
        return "handed_back"
    # optuna's own tell (as study.optimize uses it): the public one reads the trial back
    # for a deep copy that is not needed here.
    if state == TrialState.COMPLETE:
        db(lambda: _tell_with_warning(study, trial, value), f"reporting trial {trial.number}")
    else:
        db(lambda: _tell_with_warning(study, trial, state=state), f"reporting trial {trial.number}")
    summary.counts[state.name] += 1
    if state == TrialState.COMPLETE and (summary.best is None or value < summary.best[1]):
        summary.best = (trial.number, value)
    epoch = trial.user_attrs.get("epoch") if hasattr(trial, "user_attrs") else None
    detail = f"value {value:.4g}" if value is not None else reason
    log(
        f"trial {trial.number} {state.name} {detail}"
        + (f" (epoch {epoch})" if epoch else "")
        + f" in {seconds:.1f} s | {_compact(trial.params)}"
    )
    return state.name
