"""The training loop: ``fit`` runs ``train_one_epoch`` and ``validate`` epoch after epoch.

The epoch itself is in :mod:`stagetune.epoch`, what a model dir holds and when
its checkpoint resumes in :mod:`stagetune.model_dir`; both are re-exported here.

Training reports through callbacks (:class:`EpochResult` after every epoch) and
never imports optuna; a callback may raise to stop training (the optimizer's
objective raises ``TrialPruned`` from one).

Determinism: every batch reseeds torch from ``(seed, epoch, batch)``, so a run
resumed from any checkpoint (epoch end, or mid-epoch after SIGTERM/SIGINT)
ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from stagetune.adaptation import ADAPT_KEY, Adaptation, base_change, base_normalizer, load_base
from stagetune.checkpoint import (
    CHECKPOINT_FORMAT,
    DATA_KEY,
    OWNER_KEY,
    atomic_save,
    data_identity,
    load_checkpoint,
    load_model_file,
    rng_state,
    save_model_file,
    set_rng_state,
    versions,
)
from stagetune.config import Config, to_dict, write_ini
from stagetune.corpus import Corpus, subset_corpus
from stagetune.dataset import BucketBatchSampler, UtteranceDataset, collate
from stagetune.epoch import EpochStopped, decode_batches, train_one_epoch, validate
from stagetune.errors import StagetuneError, TrainingInterrupted, TrialLost, UsageError
from stagetune.failures import is_non_finite_loss
from stagetune.feasibility import check_feasible
from stagetune.metrics import ErrorCounts
from stagetune.model import AcousticModel, build_model
from stagetune.tasks import task_of
from stagetune.model_dir import (
    BEST_NAME,
    CHECKPOINT_NAME,
    CONFIG_NAME,
    HISTORY_NAME,
    MODEL_NAME,
    check_model_dir,
    check_resumable,
)
from stagetune.normalize import fit_normalizer, stored_normalizer
from stagetune.schedule import LearningRateSchedule
from stagetune.signals import handling

__all__ = [
    "EpochResult",
    "FitResult",
    "Callback",
    "TrainingInterrupted",
    "NonFiniteLoss",
    "resolve_device",
    "make_optimizer",
    "train_one_epoch",
    "validate",
    "decode_batches",
    "fit",
    "check_model_dir",
    "CHECKPOINT_NAME",
    "MODEL_NAME",
    "HISTORY_NAME",
]


@dataclass
class EpochResult:
    """What one epoch produced; passed to every callback.

    ``dev_loss`` is the task's loss over the dev set per unit (CTC: per target
    token; frame: per labelled output frame), the model in eval mode
    (:func:`validate`); unlike the dev error it still ranks models on CTC's
    all-blank plateau.
    """

    epoch: int
    train_loss: float
    dev_error: float
    dev_loss: float
    learning_rate: float
    seconds: float
    frames_per_second: float
    padding_fraction: float
    best: bool
    dev_counts: ErrorCounts = field(repr=False, default_factory=ErrorCounts)
    #: Each extra dev set's ``(error, loss)`` (:attr:`Corpus.extra_dev`).
    extra_dev: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: The task's own dev figures by name (:attr:`TaskScore.figures`, e.g. regression's
    #: ``mse`` and ``ccc``), written as ``dev_NAME`` columns.
    dev_metrics: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The ``history.csv`` row (extra dev sets as ``dev_error:NAME`` and ``dev_loss:NAME``,
        the task's figures as ``dev_NAME``)."""
        extra = {f"dev_{name}": f"{value:.6g}" for name, value in self.dev_metrics.items()}
        for name, (error, loss) in self.extra_dev.items():
            extra[f"dev_error:{name}"], extra[f"dev_loss:{name}"] = f"{error:.6g}", f"{loss:.6g}"
        return {
            "epoch": self.epoch,
            "train_loss": f"{self.train_loss:.6g}",
            "dev_error": f"{self.dev_error:.6g}",
            "dev_loss": f"{self.dev_loss:.6g}",
            "learning_rate": f"{self.learning_rate:.6g}",
            "seconds": f"{self.seconds:.3f}",
            "frames_per_second": f"{self.frames_per_second:.1f}",
            "padding_fraction": f"{self.padding_fraction:.4f}",
            **extra,
        }


@dataclass
class FitResult:
    """The outcome of :func:`fit`."""

    best_dev_error: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    model_path: Path
    resumed_from_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Callback(Protocol):
    """Receives every finished epoch; may raise to stop training."""

    def __call__(self, result: EpochResult) -> None: ...


class NonFiniteLoss(StagetuneError):
    """The training loss became NaN or infinite."""


def resolve_device(name: str | None) -> torch.device:
    """``None`` -> cuda when available, else cpu; reject unusable devices."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def make_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """The optimizer named by ``training.optimizer``."""
    t = config.training
    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "adam": lambda: torch.optim.Adam(
            model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
        ),
        "adamw": lambda: torch.optim.AdamW(
            model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
        ),
        "sgd": lambda: torch.optim.SGD(
            model.parameters(), lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay
        ),
    }
    return factories[t.optimizer]()


class _Signals:
    """Turns SIGTERM/SIGINT into a flag checked between batches."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.acted = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @contextmanager
    def installed(self) -> Iterator[_Signals]:
        previous = None
        try:
            with handling(self._handle) as previous:
                yield self
        finally:
            if previous and self.received is not None and not self.acted and callable(previous[self.received]):
                # Arrived after the last batch: training is complete, but the caller
                # (an optim worker) still wants to hear about it.
                signal.raise_signal(self.received)


def _loader(
    dataset: UtteranceDataset, batches: Sequence[list[int]], num_workers: int, device: torch.device
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        # Every column of a row today, then any only older rows have; older rows
        # lacking a newer column (a run resumed across versions) leave it empty.
        current = EpochResult(0, 0, 0, 0, 0, 0, 0, 0, False).row()
        fields = list(dict.fromkeys([*current, *(key for row in rows for key in row)]))
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _init_from(
    model: AcousticModel, path: Path, log: Callable[[str], None], source: Any = None, flag: str = "--init-from"
) -> None:
    source = source or load_model_file(path)
    own = model.state_dict()
    loadable = {
        k: v for k, v in source.state_dict.items() if k in own and own[k].shape == v.shape
    }
    if not loadable:
        raise UsageError(
            f"{flag} {path}: no parameter matches this model's names and shapes; "
            f"use a model with the same [model] architecture"
        )
    model.load_state_dict(loadable, strict=False)
    skipped = len(own) - len(loadable)
    log(f"initialised {len(loadable)} tensors from {path}" + (f" ({skipped} kept fresh)" if skipped else ""))


def fit(
    config: Config,
    corpus: Corpus,
    model_dir: str | Path,
    *,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    callbacks: Sequence[Callback] = (),
    init_from: str | Path | None = None,
    adapt_from: str | Path | None = None,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
    stop_signal: Callable[[], int | None] = lambda: None,
    owner: str | None = None,
    still_owner: Callable[[bool], bool] | None = None,
) -> FitResult:
    """Train (or resume training of) a model in ``model_dir``.

    Re-running with the same arguments resumes from ``checkpoint.pt``; a run
    that already finished returns its stored result without training.

    Args:
        config: The resolved configuration.
        corpus: Train and dev utterances; :func:`stagetune.corpus.load_corpus`
            has checked their targets (:func:`stagetune.corpus.check_targets`).
        model_dir: Where checkpoints, ``history.csv`` and ``model.pt`` go.
        device: Torch device (default: cuda when available).
        num_workers: DataLoader worker processes.
        callbacks: Called with every :class:`EpochResult`.
        init_from: A ``model.pt`` whose matching weights initialise the model.
        adapt_from: A base ``model.pt`` (:mod:`stagetune.adaptation`): it initialises
            the model as ``init_from`` does, and with ``training.adapt_rho > 0``
            every step's loss is regularised towards its outputs. It must have this
            run's task, feature dimension and output symbols. The checkpoint and
            ``model.pt`` record it (path and hash); resuming with another base is
            refused. Without it ``training.adapt_rho`` has no effect.
        quiet: No progress bar or per-epoch lines.
        log: Where progress lines go (default: stderr unless ``quiet``).
            Warnings (``stagetune: warning: ...``) go there too, and to stderr
            even when ``quiet``.
        stop_signal: A signal the caller received before or while ``fit`` runs
            (e.g. an optim worker's SIGTERM flag); acted on like our own.
        owner: An opaque id of whom this training is for (an optim study's
            uid), stored in the checkpoint and model file; a checkpoint stored
            for another owner is refused.
        still_owner: Whether ``model_dir`` is still the caller's (an optim worker's
            trial may be taken over by another worker): asked with False between
            batches (cheap), with True before each write; once it says no, training
            stops without writing anything more and raises ``TrialLost``.

    The checkpoint also records the train and dev data (:func:`data_identity`):
    resuming on other data is refused; a checkpoint written before it was
    recorded resumes with a warning.

    Raises:
        TrainingInterrupted: After SIGTERM/SIGINT, once the checkpoint is saved.
        NonFiniteLoss: When the training loss is NaN or infinite.
        InfeasibleStride: When the model's time stride leaves some CTC
            utterances too few output frames (before anything is written).
        UsageError: When ``model_dir`` is a file, a Kaldi data dir or another
            non-empty directory (see :func:`check_model_dir`), or holds a
            checkpoint of another config, data or owner.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)

    def to_stderr(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    warn_to = log or to_stderr  # warnings are heard even when quiet

    def warn(message: str) -> None:
        warn_to(f"stagetune: warning: {message}")

    if log is None:
        log = (lambda _msg: None) if quiet else to_stderr
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    t = config.training
    task = task_of(config)
    symbols = corpus.token_symbols  # of the whole training set: a subset's model reads every dir
    if config.data.subset:
        full = (len(corpus.train_ids), len(corpus.dev_ids))
        corpus = subset_corpus(corpus, config.data.subset)
        log(
            f"debug subset (data.subset = {config.data.subset:g}): {len(corpus.train_ids)} of {full[0]} "
            f"training and {len(corpus.dev_ids)} of {full[1]} dev utterances"
        )
    torch.manual_seed(t.seed)
    model = build_model(config, corpus.feat_dim, task.num_outputs(len(symbols))).to(device)
    base, adaptation = None, None
    if adapt_from is not None:
        if init_from is not None:
            raise UsageError("give --init-from or --adapt-from, not both (--adapt-from initialises from the base too)")
        base = load_base(adapt_from, config, corpus.feat_dim, symbols, device, time_stride=model.time_stride)
        adaptation = Adaptation(base.model, t.adapt_rho)
    optimizer = make_optimizer(model, config)
    scheduler = LearningRateSchedule(optimizer, t)
    use_amp = device.type == "cuda" and t.autocast
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    state: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "loss_sum": 0.0,  # of the batches before "batch" in a mid-epoch checkpoint
        "history": [],
        "best_error": math.inf,
        "best_epoch": 0,
        "bad_epochs": 0,
        "es_reference": math.inf,
        "stopped_early": False,
    }
    ckpt_path = model_dir / CHECKPOINT_NAME
    resumed_from = 0
    ckpt: dict[str, Any] | None = None
    data = data_identity(corpus)
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, warn)
        check_resumable(
            ckpt,
            model_dir,
            config=config,
            feat_dim=corpus.feat_dim,
            tokens=symbols,
            data=data,
            owner=owner,
            warn=warn,
        )
        change = base_change(ckpt.get(ADAPT_KEY), base.identity if base else None, str(ckpt_path))
        if change is not None:
            raise UsageError(f"{change}; use a new model directory, or the same base model to resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state.update(ckpt["state"])
        resumed_from = state["epoch"]
        if state["stopped_early"] or state["epoch"] >= t.num_epochs:
            log(f"{model_dir}: already trained ({state['epoch']} epochs); nothing to do")
        else:
            at = f"epoch {state['epoch'] + 1}"
            log(f"resuming {model_dir} at {at}" + (f", batch {state['batch'] + 1}" if state["batch"] else ""))
    elif init_from is not None:
        _init_from(model, Path(init_from), log)
    elif base is not None:
        _init_from(model, Path(adapt_from), log, base.file, "--adapt-from")  # type: ignore[arg-type]
    # Before any feature is read or anything written: CTC cannot learn utterances
    # the time stride leaves too few output frames, and would say nothing.
    check_feasible(config, corpus)
    # Statistics come from the training utterances only; a resumed run normalises
    # exactly as before, with what its checkpoint (loaded above) carries.
    if ckpt is not None:
        normalizer = stored_normalizer(
            ckpt.get("normalization"), config.data.normalization, corpus.train, str(ckpt_path)
        )
    else:
        adapted = base_normalizer(base, config.data.normalization, corpus.train, adapt_from) if base else None  # type: ignore[arg-type]
        if adapted is not None:
            normalizer = adapted
        else:
            normalizer = fit_normalizer(config.data.normalization, corpus.train, corpus.train_ids, log=log)
        if base is None:  # the head's own statistics (regression targets); the base's when adapting
            fitted = task.fit_head(model.output, corpus.train, corpus.train_ids)
            if fitted:
                log(fitted)
    train_set = UtteranceDataset(corpus.train, corpus.train_ids, normalizer=normalizer)
    dev_set = UtteranceDataset(corpus.dev, corpus.dev_ids, normalizer=normalizer)
    # Only now that data, normalisation, config, checkpoint and --init-from are known good.
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_NAME).write_text(write_ini(config))

    part_index = {u: i for i, u in enumerate(corpus.train_ids)}
    parts = [[part_index[u] for u in p if u in part_index] for p in corpus.train.parts]
    sampler = BucketBatchSampler(
        train_set.lengths,
        config.data.batch_size_for(len(train_set)),
        shuffle=True,
        seed=t.seed,
        drop_last=config.data.drop_last,
        jitter=config.data.length_jitter,
        parts=parts if len(parts) > 1 else None,
        ascending_epochs=config.data.sortagrad_epochs,
    )
    dev_sampler = BucketBatchSampler(dev_set.lengths, config.data.batch_size, shuffle=False)
    dev_loader = _loader(dev_set, list(dev_sampler), num_workers, device)
    extra_loaders = {}
    for name, data in corpus.extra_dev.items():
        extra_set = UtteranceDataset(data, data.utt_ids, normalizer=normalizer)
        extra_batches = list(BucketBatchSampler(extra_set.lengths, config.data.batch_size, shuffle=False))
        extra_loaders[name] = _loader(extra_set, extra_batches, num_workers, device)

    def checkpoint() -> None:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                "config": to_dict(config),
                "feat_dim": corpus.feat_dim,
                "tokens": symbols,
                "normalization": normalizer.to_dict(),
                DATA_KEY: data,
                OWNER_KEY: owner,
                ADAPT_KEY: base.identity if base else None,
                "state": state,
                "versions": versions(),
            },
            ckpt_path,
            keep_previous=True,  # an unreadable checkpoint.pt falls back to checkpoint.pt.prev
        )

    signals = _Signals()
    with signals.installed():
        while state["epoch"] < t.num_epochs and not state["stopped_early"]:
            epoch = state["epoch"] + 1
            sampler.set_epoch(epoch)
            batches = list(sampler)
            first = state["batch"]
            started = time.perf_counter()
            bar = tqdm(
                total=len(batches),
                initial=first,
                desc=f"epoch {epoch}/{t.num_epochs}",
                file=sys.stderr,
                disable=quiet,
                leave=False,
                dynamic_ncols=True,
            )
            try:
                loss_sum, frames = train_one_epoch(
                    model,
                    _loader(train_set, batches[first:], num_workers, device),
                    optimizer,
                    config,
                    epoch=epoch,
                    first_batch=first,
                    device=device,
                    scaler=scaler,
                    should_stop=lambda: signals.received is not None or stop_signal() is not None
                    or (still_owner is not None and not still_owner(False)),
                    progress=bar,
                    schedule=scheduler,
                    start_loss_sum=state["loss_sum"],
                    adaptation=adaptation,
                )
            except EpochStopped as stop:
                signals.acted = True
                bar.close()
                state["batch"], state["loss_sum"] = stop.batches_done, stop.loss_sum
                _check_owner(still_owner, model_dir)
                checkpoint()
                signum = signals.received or stop_signal() or signal.SIGTERM
                name = signal.Signals(signum).name
                raise TrainingInterrupted(
                    f"{name} received: checkpoint saved in {model_dir} at epoch {epoch}, "
                    f"batch {stop.batches_done}/{len(batches)}; rerun the same command to resume",
                    signum,
                ) from None
            finally:
                bar.close()
            if not math.isfinite(loss_sum) or is_non_finite_loss(torch.tensor(loss_sum)):
                raise NonFiniteLoss(
                    f"training loss became {loss_sum} in epoch {epoch}; lower "
                    f"training.learning_rate or set training.clip_grad_norm"
                )
            score, dev_loss = validate(model, dev_loader, task, device)
            counts = score.counts
            extra_dev = {}
            for name, loader in extra_loaders.items():
                extra_score, extra_loss = validate(model, loader, task, device)
                extra_dev[name] = (extra_score.error, extra_loss)
            _check_owner(still_owner, model_dir)
            seconds = time.perf_counter() - started
            dev_error = score.error
            lr = optimizer.param_groups[0]["lr"]
            best = dev_error < state["best_error"]
            if best:
                state["best_error"], state["best_epoch"] = dev_error, epoch
                atomic_save(model.state_dict(), model_dir / BEST_NAME)
            if scheduler.validated(dev_error, counts):
                log(f"learning rate reduced to {scheduler.lr:.3g} after epoch {epoch}")
            if t.early_stopping_threshold > 0:
                if dev_error < state["es_reference"] * (1 - t.early_stopping_threshold):
                    state["es_reference"], state["bad_epochs"] = dev_error, 0
                else:
                    state["bad_epochs"] += 1
                if epoch >= t.early_stopping_burnin and state["bad_epochs"] >= t.early_stopping_patience:
                    state["stopped_early"] = True
            result = EpochResult(
                epoch=epoch,
                train_loss=loss_sum / max(len(batches), 1),
                dev_error=dev_error,
                dev_loss=dev_loss,
                learning_rate=lr,
                seconds=seconds,
                frames_per_second=frames / max(seconds, 1e-9),
                padding_fraction=sampler.padding_fraction(),
                best=best,
                dev_counts=counts,
                extra_dev=extra_dev,
                dev_metrics=dict(score.figures),
            )
            state["history"].append(result.row())
            state["epoch"], state["batch"], state["loss_sum"] = epoch, 0, 0.0
            _write_history(model_dir / HISTORY_NAME, state["history"])
            log(
                f"epoch {epoch}/{t.num_epochs}: train loss {result.train_loss:.4f}, "
                f"dev error {dev_error:.2%}{' (best)' if best else ''}, dev loss {dev_loss:.4f}, "
                + "".join(f"dev {name} {value:.4g}, " for name, value in score.figures.items())
                + "".join(f"{name} error {error:.2%}, " for name, (error, _) in extra_dev.items())
                + f"lr {lr:.3g}, {seconds:.1f} s"
            )
            checkpoint()
            for callback in callbacks:
                callback(result)
            if signals.received is not None and state["epoch"] < t.num_epochs and not state["stopped_early"]:
                signals.acted = True
                name = signal.Signals(signals.received).name
                raise TrainingInterrupted(
                    f"{name} received: checkpoint saved in {model_dir} after epoch {epoch}; "
                    f"rerun the same command to resume",
                    signals.received,
                )
            if state["stopped_early"]:
                log(f"early stopping after epoch {epoch}: no improvement for {state['bad_epochs']} epochs")
                break

    best_state = torch.load(model_dir / BEST_NAME, map_location="cpu", weights_only=True)
    save_model_file(
        model_dir / MODEL_NAME,
        state_dict=best_state,
        config=config,
        feat_dim=corpus.feat_dim,
        tokens=symbols,
        extra={
            "best_epoch": state["best_epoch"],
            "best_dev_error": state["best_error"],
            "normalization": normalizer.to_dict(),
            DATA_KEY: data,
            OWNER_KEY: owner,
            ADAPT_KEY: base.identity if base else None,
        },
    )
    return _result(state, model_dir, resumed_from)


def _check_owner(still_owner: Callable[[bool], bool] | None, model_dir: Path) -> None:
    """Raise ``TrialLost`` (before any write) when ``model_dir`` is no longer the caller's."""
    if still_owner is not None and not still_owner(True):
        raise TrialLost(f"training in {model_dir} stopped: another worker took it over")


def _result(state: dict[str, Any], model_dir: Path, resumed_from: int) -> FitResult:
    return FitResult(
        best_dev_error=state["best_error"],
        best_epoch=state["best_epoch"],
        epochs_run=state["epoch"],
        stopped_early=state["stopped_early"],
        model_path=model_dir / MODEL_NAME,
        resumed_from_epoch=resumed_from,
        history=list(state["history"]),
    )
