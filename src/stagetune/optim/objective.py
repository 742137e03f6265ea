"""Objectives: what a worker runs for one trial.

``train`` samples a config from the study spec, reuses the result of an
identical completed trial, prunes a config whose time stride leaves some
utterances too few output frames for CTC, checks its memory footprint against
the budget and its projected training time against the time limit
(:mod:`stagetune.optim.duration`), and otherwise trains with per-epoch
reporting and pruning; only the best completed trial's model dir is kept
(every trial's with ``keep_models``).  A trial's model dir that holds a checkpoint of
another study (one deleted and created again under the same name) is moved
aside first, never resumed.  Each epoch's value is the study's metric
(:mod:`stagetune.optim.metrics`) of its dev error and dev loss; the trial's
value is the lowest.  In a study that adapts a base model (``optim init
--adapt-from``) every trial first checks that the base file is still there with
the hash the spec recorded (else the trial fails, naming the file), prunes a
per-frame config whose time stride differs from the base's, counts the base in
its memory and time checks, and trains with ``fit(adapt_from=...)``.
``quadratic`` and ``sleep`` are trivial objectives
over the same search space, for benchmarks and tests of the search
machinery.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import time
import zlib
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

import optuna

from stagetune.config import Config, flatten
from stagetune.errors import StagetuneError, TrainingInterrupted, TrialLost
from stagetune.optim.metrics import DEV_ERROR_ATTR, DEV_LOSS_ATTR, METRICS, VALUE_EPOCH_ATTR, Metric
from stagetune.optim.optuna_internals import storage_of, study_id_of, trial_id_of
from stagetune.optim.sampling import sample_config
from stagetune.optim.spec import StudySpec

if TYPE_CHECKING:  # torch stays unimported for the quadratic and sleep objectives
    import torch

    from stagetune.optim.estimate import Footprint, SyntheticStep

__all__ = ["TrialContext", "OBJECTIVES", "DbCall", "original_trial_number", "FootprintCache", "base_problem"]

FOOTPRINT_PREFIX = "stagetune_footprint:"
#: Trial user attributes of the time check: seconds of one step on the largest
#: batch, the projected training seconds, the limit (on a trial it pruned),
#: and the seconds the attempt actually spent training (to compare).
STEP_SECONDS_ATTR = "step_s"
PROJECTED_ATTR = "projected_train_s"
TIME_LIMIT_ATTR = "time_limit_s"
TRAIN_SECONDS_ATTR = "train_s"

#: Runs a database call ``fn`` described by ``what``; the worker's rides out outages.
DbCall = Callable[[Callable[[], Any], str], Any]


@dataclass
class TrialContext:
    """What every objective may use, built once per worker."""

    study: optuna.Study
    spec: StudySpec
    device: str | None
    ckpt_dir: Path
    num_data_workers: int = 0
    keep_models: bool = False
    sleep_seconds: float = 1.0
    log: Callable[[str], None] = print
    #: Where what a user must hear goes whatever the verbosity (moved-aside model dirs).
    warn: Callable[[str], None] = lambda message: print(
        f"stagetune: warning: {message}", file=sys.stderr, flush=True
    )
    stop_signal: Callable[[], int | None] = lambda: None
    #: (trial, run name) -> more per-epoch callbacks of its training (``optim run --tensorboard``)
    epoch_callbacks: Callable[[Any, str], list[Callable[[Any], None]]] = lambda trial, run: []
    #: Whether the running trial is still this worker's (``confirm``: ask the database,
    #: before writing its checkpoint dir); False once another worker took it over.
    still_owner: Callable[[bool], bool] = lambda confirm=False: True
    corpus: Any = None
    #: trial -> context in which its parameters are buffered and written at once at the end
    batch_params: Callable[[Any], ContextManager[None]] = lambda trial: contextlib.nullcontext()
    db: DbCall = lambda fn, what: fn()
    #: Footprint key -> seconds of one step on the largest batch, timed by this
    #: worker: the figure is the machine's, so it is never shared with others.
    step_seconds: dict[str, float] = field(default_factory=dict)
    #: The study's COMPLETE trials as ``(number, value, reused, retried_of)``
    #: (:meth:`StagetuneStorage.completed_values`); None: read them through optuna.
    completed: Callable[[], list[tuple[int, float, bool, int | None]]] | None = None
    _base: Config | None = field(default=None, repr=False)

    @property
    def base(self) -> Config:
        if self._base is None:
            self._base = self.spec.config()
        return self._base

    def sample(self, trial: Any) -> Config:
        """The trial's config; its sampled parameters reach the database in one write."""
        with self.batch_params(trial):
            return sample_config(trial, self.base, self.spec.tuned, self.spec.ranges)


class FootprintCache(MutableMapping):
    """Measured bytes per architecture, kept in the study's system attributes."""

    def __init__(self, study: optuna.Study, db: DbCall = lambda fn, what: fn()) -> None:
        self._store = storage_of(study)
        self._sid = study_id_of(study)
        self._db = db

    def _all(self) -> dict[str, Any]:
        attrs = self._db(lambda: self._store.get_study_system_attrs(self._sid), "reading footprints")
        return {k[len(FOOTPRINT_PREFIX):]: v for k, v in attrs.items() if k.startswith(FOOTPRINT_PREFIX)}

    def __getitem__(self, key: str) -> int:
        return int(self._all()[key])

    def __setitem__(self, key: str, value: int) -> None:
        self._db(
            lambda: self._store.set_study_system_attr(self._sid, FOOTPRINT_PREFIX + key, int(value)),
            "storing a footprint",
        )

    def __delitem__(self, key: str) -> None:
        raise TypeError("footprints are never deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def original_trial_number(study: optuna.Study, trial: optuna.Trial) -> int:
    """The number of the trial this one retries (itself when it is no retry)."""
    frozen = storage_of(study).get_trial(trial_id_of(trial))  # retried_trial_number needs a FrozenTrial
    number = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)
    return trial.number if number is None else number


def _prune(trial: optuna.Trial, reason: str) -> optuna.TrialPruned:
    trial.set_user_attr("prune_reason", reason)
    return optuna.TrialPruned(reason)


class _BestEpoch:
    """The epoch with the lowest metric value so far, kept in the trial's user attributes.

    A retried trial inherits the attributes (and the pruner's intermediate values) of
    the attempt it retries, so its value also covers the epochs trained before.
    """

    _ATTRS = (VALUE_EPOCH_ATTR, DEV_ERROR_ATTR, DEV_LOSS_ATTR)

    def __init__(self, metric: Metric, trial: optuna.Trial) -> None:
        self.metric, self.trial = metric, trial
        self.value: float | None = None
        attrs = trial.user_attrs
        #: The last epoch an earlier attempt reported.
        self.last_epoch = int(attrs.get("epoch", 0))
        if all(key in attrs for key in self._ATTRS):
            self.value = metric.value(attrs[DEV_ERROR_ATTR], attrs[DEV_LOSS_ATTR])

    def see(self, epoch: int, dev_error: float, dev_loss: float) -> float:
        """The epoch's value; stored in the trial when it is the lowest so far."""
        value = self.metric.value(dev_error, dev_loss)
        self.last_epoch = max(self.last_epoch, epoch)
        if self.value is None or value < self.value:
            self.value = value
            for key, figure in zip(self._ATTRS, (epoch, dev_error, dev_loss)):
                self.trial.set_user_attr(key, figure)
        return value

    def see_history(self, rows: list[dict[str, Any]]) -> None:
        """Epochs trained but never reported (the worker died between checkpoint and report)."""
        for row in rows:
            if int(row["epoch"]) > self.last_epoch:
                dev_loss = float(row.get("dev_loss") or "nan")  # history.csv written before dev_loss
                self.see(int(row["epoch"]), float(row["dev_error"]), dev_loss)


def _identical_completed(ctx: TrialContext, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    params = trial.params
    completed = ctx.db(
        lambda: ctx.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
        "reading completed trials",
    )
    for other in completed:
        if other.params == params and "reused_from" not in other.user_attrs:
            return other
    return None


def _set_aside_foreign(ctx: TrialContext, trial: optuna.Trial, model_dir: Path) -> None:
    """Move ``model_dir`` aside when its checkpoint was trained for another study.

    The study's uid goes into every trial checkpoint; a study deleted and created
    again under the same name (on other data, say) finds the old one's trial dirs
    under the same paths and must neither resume nor report them.
    """
    from stagetune.checkpoint import OWNER_KEY, load_checkpoint
    from stagetune.training import CHECKPOINT_NAME

    uid = ctx.spec.study_uid
    ckpt_path = model_dir / CHECKPOINT_NAME
    if uid is None or not ckpt_path.exists():  # a study from before uids: nothing to compare
        return
    owner = load_checkpoint(ckpt_path).get(OWNER_KEY)
    if owner == uid:
        return
    stem = f"{model_dir.name}.other-study-{(owner or 'unknown')[:8]}"
    aside = model_dir.with_name(stem)
    copy = 1
    while aside.exists():
        copy += 1
        aside = model_dir.with_name(f"{stem}-{copy}")
    model_dir.rename(aside)
    ctx.warn(
        f"trial {trial.number}: {model_dir} held a checkpoint of another study "
        f"(uid {owner or 'unknown'}, this study's is {uid}); moved it to {aside.name} and training anew"
    )


def base_problem(identity: dict[str, str]) -> str | None:
    """Why the study's base model (:attr:`StudySpec.adapt_from`) cannot be used here, or None.

    The file must be where ``optim init --adapt-from`` found it, with the same hash:
    every worker, wherever it runs, adapts the same base.
    """
    from stagetune.adaptation import file_hash

    path = Path(identity["path"])
    if not path.is_file():
        return f"base model {path} (optim init --adapt-from) is missing on this worker"
    try:
        found = file_hash(path)
    except OSError as exc:
        return f"base model {path} (optim init --adapt-from) cannot be read on this worker: {exc.strerror or exc}"
    if found != identity["hash"]:
        return (
            f"base model {path} (optim init --adapt-from) has changed since the study was created "
            f"(hash {identity['hash'][:8]}, now {found[:8]}); put the original back, or create a new study"
        )
    return None


def _base_config(spec: StudySpec) -> Config | None:
    """The study's base model's config, once :func:`base_problem` finds nothing wrong; None without a base.

    Raises:
        StagetuneError: The base is missing or changed (the trial fails, naming the file).
    """
    if spec.adapt_from is None:
        return None
    problem = base_problem(spec.adapt_from)
    if problem is not None:
        raise StagetuneError(problem)
    from stagetune.checkpoint import load_model_file

    return load_model_file(spec.adapt_from["path"]).config


def _time_stride(config: Config, feat_dim: int, num_outputs: int) -> int:
    """The total time stride of ``config``'s model (built on the meta device: no memory)."""
    import torch

    from stagetune.model import build_model

    with torch.device("meta"):
        return int(build_model(config, feat_dim, num_outputs).time_stride)


def _train(ctx: TrialContext, trial: optuna.Trial) -> float:
    from stagetune.failures import is_out_of_memory
    from stagetune.feasibility import find_shortfall
    from stagetune.tasks import task_of
    from stagetune.optim.duration import TIMED_STEPS
    from stagetune.optim.memory import check_footprint, footprint_key
    from stagetune.training import NonFiniteLoss, fit, resolve_device

    spec = ctx.spec
    config = ctx.sample(trial)
    twin = _identical_completed(ctx, trial)
    if twin is not None:
        trial.set_user_attr("reused_from", twin.number)
        for key in _BestEpoch._ATTRS:
            if key in twin.user_attrs:
                trial.set_user_attr(key, twin.user_attrs[key])
        ctx.log(f"trial {trial.number}: same config as completed trial {twin.number}; reusing its result")
        return float(twin.value)
    shortfall = find_shortfall(config, ctx.corpus)
    if shortfall is not None:
        trial.set_user_attr("short_utterances", shortfall.affected)
        raise _prune(trial, shortfall.message())
    device = resolve_device(spec.device if ctx.device is None else ctx.device)
    num_outputs = task_of(config).num_outputs(len(spec.tokens))
    base = _base_config(spec)
    if base is not None and config.model.task != "utt":
        own, theirs = _time_stride(config, spec.feat_dim, num_outputs), _time_stride(base, spec.feat_dim, num_outputs)
        if own != theirs:  # per-frame outputs must align with the base's (training refuses it)
            raise _prune(trial, f"time stride {own} differs from the base model's {theirs} (--adapt-from)")
    sizes = dict(
        batch_size=config.data.batch_size_for(len(ctx.corpus.train_ids)),
        max_frames=spec.longest_utterance,
        max_target_len=spec.longest_transcript,
    )
    key = footprint_key(config, spec.feat_dim, num_outputs, **sizes, device=device, base=base)
    footprint = None
    if spec.mem_limit_bytes is not None:
        timing = spec.time_limit_s is not None and key not in ctx.step_seconds

        def time_it(step: SyntheticStep) -> None:  # the measured step was the warm-up
            ctx.step_seconds[key] = step.timed(TIMED_STEPS)

        footprint = check_footprint(
            config,
            spec.feat_dim,
            num_outputs,
            **sizes,
            device=device,
            limit_bytes=spec.mem_limit_bytes,
            cache=FootprintCache(ctx.study, ctx.db),
            then=time_it if timing else None,
            base=base,
        )
        trial.set_user_attr("mem_bytes", int(footprint.bytes))
        trial.set_user_attr("mem_method", footprint.method)
        if footprint.bytes > spec.mem_limit_bytes:
            raise _prune(
                trial,
                f"memory footprint {footprint.bytes} bytes ({footprint.method}) exceeds "
                f"--mem-limit-bytes {spec.mem_limit_bytes}",
            )
    if spec.time_limit_s is not None:
        _check_time(ctx, trial, config, num_outputs, device, sizes, key, footprint, base)

    best = _BestEpoch(METRICS[spec.metric], trial)

    def report(result: Any) -> None:
        value = best.see(result.epoch, result.dev_error, result.dev_loss)
        trial.report(value, result.epoch)
        trial.set_user_attr("epoch", result.epoch)
        ctx.log(
            f"trial {trial.number}: epoch {result.epoch}/{config.training.num_epochs} "
            f"dev error {result.dev_error:.2%}, dev loss {result.dev_loss:.4f}, value {value:.4g} ({spec.metric})"
        )
        if trial.should_prune():
            raise _prune(trial, f"pruned by the study's pruner after epoch {result.epoch}")

    original = ctx.db(lambda: original_trial_number(ctx.study, trial), f"trial {trial.number}: reading it")
    model_dir = ctx.ckpt_dir / f"trial-{original}"
    signum = ctx.stop_signal()
    if signum is not None:  # arrived while sampling or measuring: nothing trained yet
        raise TrainingInterrupted(f"{signal.Signals(signum).name} received before training", signum)
    if not ctx.still_owner(True):  # taken over while sampling or measuring: the dir is the retry's
        raise TrialLost(f"trial {trial.number} was taken over by another worker")
    _set_aside_foreign(ctx, trial, model_dir)
    started = time.perf_counter()
    try:
        result = fit(
            config,
            ctx.corpus,
            model_dir,
            device=device,
            num_workers=ctx.num_data_workers,
            callbacks=[report, *ctx.epoch_callbacks(trial, model_dir.name)],
            quiet=True,
            stop_signal=ctx.stop_signal,
            owner=spec.study_uid,
            still_owner=ctx.still_owner,
            adapt_from=spec.adapt_from["path"] if spec.adapt_from else None,
        )
    except NonFiniteLoss as exc:
        raise _prune(trial, f"non-finite loss: {exc}") from None
    except optuna.TrialPruned:
        _cleanup(ctx, model_dir)
        raise
    except Exception as exc:
        if is_out_of_memory(exc):
            raise _prune(trial, f"out of memory during training: {str(exc).splitlines()[0][:200]}") from None
        raise
    trial.set_user_attr("best_epoch", result.best_epoch)
    trial.set_user_attr(TRAIN_SECONDS_ATTR, round(time.perf_counter() - started, 3))
    best.see_history(result.history)
    if best.value is not None:
        _keep_if_best(ctx, trial, model_dir, float(best.value))
    if best.value is None:  # fit trains at least one epoch; never here
        raise RuntimeError(f"trial {trial.number}: training reported no epoch")
    return float(best.value)


def _check_time(
    ctx: TrialContext,
    trial: optuna.Trial,
    config: Config,
    num_outputs: int,
    device: torch.device | str,
    sizes: dict[str, int],
    key: str,
    footprint: Footprint | None,
    base: Config | None = None,
) -> None:
    """Prune a trial whose projected training time exceeds ``--time-limit``.

    The step time comes from this worker's cache, from the step after the
    memory measurement (``_train`` asked it for one), or from a step timed
    here; the projection is stored on the trial whether or not it fits.  A
    retry of an attempt that passed the check keeps that attempt's projection
    (its epochs are trained already: a second timing must not undo them).
    """
    from stagetune.failures import is_out_of_memory
    from stagetune.optim.duration import format_seconds, project_training, time_step

    spec = ctx.spec
    limit = spec.time_limit_s
    inherited = trial.user_attrs.get(PROJECTED_ATTR)
    if inherited is not None:
        seconds, how = float(inherited), "projected by an earlier attempt of this trial"
    else:
        step_seconds = ctx.step_seconds.get(key)
        if step_seconds is None and footprint is not None and footprint.method == "meta-estimate":
            # The memory check would not run this step (larger than the free RAM): nor do we.
            ctx.log(f"trial {trial.number}: training time not checked: its step was not run")
            return
        if step_seconds is None:
            try:
                step_seconds = time_step(config, spec.feat_dim, num_outputs, device=device, base=base, **sizes)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer
                if not is_out_of_memory(exc):
                    raise
                message = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
                raise _prune(trial, f"out of memory while timing a training step: {message}") from None
            ctx.step_seconds[key] = step_seconds
        corpus = ctx.corpus
        train_ids, frames = set(corpus.train_ids), corpus.train.num_frames
        projection = project_training(
            step_seconds,
            config,
            train_parts=[[frames[u] for u in part if u in train_ids] for part in corpus.train.parts],
            dev_lengths=[corpus.dev.num_frames[u] for u in corpus.dev_ids],
            max_frames=spec.longest_utterance,
        )
        seconds, how = projection.seconds, projection.describe()
        trial.set_user_attr(STEP_SECONDS_ATTR, step_seconds)
        trial.set_user_attr(PROJECTED_ATTR, seconds)
    ctx.log(f"trial {trial.number}: projected training time {format_seconds(seconds)} s ({how})")
    if seconds > limit:
        trial.set_user_attr(TIME_LIMIT_ATTR, limit)
        raise _prune(
            trial,
            f"projected {format_seconds(seconds)} s of training exceeds --time-limit {limit:g} s ({how})",
        )


def _cleanup(ctx: TrialContext, model_dir: Path) -> None:
    if not ctx.keep_models:
        shutil.rmtree(model_dir, ignore_errors=True)


def _keep_if_best(ctx: TrialContext, trial: optuna.Trial, model_dir: Path, value: float) -> None:
    """Keep the model dir of the study's best trial only (all of them with ``keep_models``).

    The best of the completed trials (the lowest value, then the lowest number; a
    trial that reused another's result has no dir of its own) and this one keeps its
    ``trial-N`` dir, for ``optim best --model``; the dirs of the other completed
    trials go (two workers finishing at once may both keep theirs: the next
    completed trial removes the loser's).  Dirs of running trials are never touched.
    """
    if ctx.keep_models:
        return
    if ctx.completed is not None:
        completed = ctx.db(ctx.completed, "reading completed trials")
    else:
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
        completed = [
            (t.number, t.value, "reused_from" in t.user_attrs, retried(t))
            for t in ctx.db(
                lambda: ctx.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                "reading completed trials",
            )
            if t.value is not None
        ]
    # A trial that reused another's result has no dir of its own; a retry trains in its original's dir.
    own = {number: (value, number if retried_of is None else retried_of)
           for number, value, reused, retried_of in completed if not reused}
    best = min(own, key=lambda n: (own[n][0], n), default=None)
    mine_best = best is None or (value, trial.number) < (own[best][0], best)
    keep = model_dir.name if mine_best else f"trial-{own[best][1]}"
    for _, dir_number in own.values():
        name = f"trial-{dir_number}"
        if name != keep:
            shutil.rmtree(ctx.ckpt_dir / name, ignore_errors=True)
    if not mine_best:
        shutil.rmtree(model_dir, ignore_errors=True)


def _quadratic(ctx: TrialContext, trial: optuna.Trial) -> float:
    """A smooth function of every sampled numeric value (no training)."""
    config = ctx.sample(trial)
    flat = flatten(config)
    value = 0.0
    for name in trial.params:
        v = flat[name]
        if isinstance(v, (bool, str)):
            value += 0.1 * (zlib.crc32(str(v).encode()) % 7) / 7
        else:
            value += (math.log10(abs(v) + 1e-9) if abs(v) > 0 else 0.0) ** 2 * 0.01
    return value


def _sleep(ctx: TrialContext, trial: optuna.Trial) -> float:
    """``quadratic``, then a sleep that SIGTERM/SIGINT cut short (the trial is handed back)."""
    value = _quadratic(ctx, trial)
    deadline = time.monotonic() + ctx.sleep_seconds
    while (left := deadline - time.monotonic()) > 0:
        signum = ctx.stop_signal()
        if signum is not None:
            raise TrainingInterrupted(f"trial {trial.number} interrupted while sleeping", signum)
        if not ctx.still_owner(False):
            raise TrialLost(f"trial {trial.number} was taken over by another worker")
        time.sleep(min(left, 0.05))
    return value


#: Objective name -> function of (context, trial) returning the value to minimise.
OBJECTIVES: dict[str, Callable[[TrialContext, optuna.Trial], float]] = {
    "train": _train,
    "quadratic": _quadratic,
    "sleep": _sleep,
}
