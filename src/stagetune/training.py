"""The training loop: ``train_one_epoch``, ``validate``, ``fit``.

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
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from stagetune.augment import augment_batch, augmentation_enabled
from stagetune.checkpoint import (
    CHECKPOINT_FORMAT,
    DATA_KEY,
    OWNER_KEY,
    atomic_save,
    data_change,
    data_identity,
    load_checkpoint,
    load_model_file,
    rng_state,
    save_model_file,
    set_rng_state,
    versions,
)
from stagetune.config import Config, flatten, from_dict, to_dict, write_ini
from stagetune.corpus import Corpus
from stagetune.dataset import BucketBatchSampler, UtteranceDataset, collate
from stagetune.errors import DataError, StagetuneError, TrainingInterrupted, UsageError
from stagetune.failures import is_non_finite_loss
from stagetune.feasibility import check_feasible
from stagetune.kaldi import DataDir
from stagetune.metrics import ErrorCounts
from stagetune.model import TASKS, AcousticModel, build_model
from stagetune.normalize import fit_normalizer, stored_normalizer
from stagetune.schedule import LearningRateSchedule

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

CHECKPOINT_NAME = "checkpoint.pt"
BEST_NAME = "best.pt"
MODEL_NAME = "model.pt"
HISTORY_NAME = "history.csv"
CONFIG_NAME = "config.ini"

#: What :func:`fit` writes into a model dir (temporary files start with one of these,
#: or with a dot and one of these).
MODEL_DIR_FILES = (CHECKPOINT_NAME, BEST_NAME, MODEL_NAME, HISTORY_NAME, CONFIG_NAME)
#: Files that make a directory a Kaldi data dir: one named as MODEL_DIR is a
#: forgotten MODEL_DIR argument (``train TRAIN_DIR DEV_DIR``).
_DATA_DIR_FILES = ("feats.scp", "wav.scp", "segments", "utt2spk", "spk2utt", "cmvn.scp", "utt2label")

#: Config fields that may change between runs resuming one model dir.
_RESUMABLE_CHANGES = {"training.num_epochs"}


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

    def row(self) -> dict[str, Any]:
        """The ``history.csv`` row."""
        return {
            "epoch": self.epoch,
            "train_loss": f"{self.train_loss:.6g}",
            "dev_error": f"{self.dev_error:.6g}",
            "dev_loss": f"{self.dev_loss:.6g}",
            "learning_rate": f"{self.learning_rate:.6g}",
            "seconds": f"{self.seconds:.3f}",
            "frames_per_second": f"{self.frames_per_second:.1f}",
            "padding_fraction": f"{self.padding_fraction:.4f}",
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


def check_model_dir(model_dir: str | Path) -> None:
    """Refuse a model dir that :func:`fit` would write into by mistake.

    A new or empty directory, or one holding what ``fit`` writes, is fine; a
    file, a Kaldi data dir (a forgotten MODEL_DIR argument turns DEV_DIR into the
    model dir) or any other non-empty directory is a :class:`UsageError`.
    """
    path = Path(model_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise UsageError(f"model dir {path} {where}; give a new directory (or one of an earlier run)")
    if existing != path:
        return
    names = sorted(p.name for p in path.iterdir())
    data_files = [name for name in names if name in _DATA_DIR_FILES]
    if data_files:
        raise UsageError(
            f"model dir {path} is a Kaldi data dir (it holds {', '.join(data_files)}); was "
            f"MODEL_DIR forgotten? train takes TRAIN_DIR [DEV_DIR] MODEL_DIR, MODEL_DIR last"
        )
    ours = [n for n in names if n.lstrip(".").startswith(MODEL_DIR_FILES)]
    if names and not ours:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UsageError(
            f"model dir {path} is not empty ({shown}) and holds no stagetune model; give a new "
            f"or empty directory"
        )


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


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + batch) % (2**63 - 1)


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
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if self.received is not None and not self.acted and callable(previous[self.received]):
                # Arrived after the last batch: training is complete, but the caller
                # (an optim worker) still wants to hear about it.
                signal.raise_signal(self.received)


class _Stop(Exception):
    """Internal: a signal arrived mid-epoch after ``batches_done`` batches."""

    def __init__(self, batches_done: int, loss_sum: float) -> None:
        super().__init__(batches_done)
        self.batches_done = batches_done
        self.loss_sum = loss_sum


def train_one_epoch(
    model: AcousticModel,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    config: Config,
    *,
    epoch: int,
    first_batch: int = 0,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: tqdm | None = None,
    schedule: LearningRateSchedule | None = None,
    start_loss_sum: float = 0.0,
) -> tuple[float, int]:
    """Train over ``loader`` (batches ``first_batch`` onwards of this epoch).

    Each :class:`Batch` holds feats (B, T, F), feat_lens (B,), targets (B, U)
    and target_lens (B,).  Returns (sum of batch losses, frames seen), the sum
    starting from ``start_loss_sum`` (the earlier batches' sum when resuming
    mid-epoch, so it adds up in the same order as an uninterrupted epoch).
    Raises ``_Stop`` between batches when ``should_stop()`` turns true.
    """
    task = TASKS[config.model.task]
    t = config.training
    model.train()
    augment = augmentation_enabled(t)
    use_amp = scaler is not None
    loss_sum = torch.full((), start_loss_sum, device=device)
    frames = 0
    for index, batch in enumerate(loader, start=first_batch):
        seed = _batch_seed(t.seed, epoch, index)
        torch.manual_seed(seed)
        batch = batch.to(device)
        feats = batch.feats
        if augment:
            gen = torch.Generator().manual_seed(seed)
            feats = augment_batch(feats, batch.feat_lens, t, gen)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=use_amp):
            logits, out_lens = model(feats, batch.feat_lens)
            loss = task.loss(
                logits, out_lens, batch.targets, batch.target_lens, time_stride=model.time_stride
            )
        if use_amp:
            scaler.scale(loss).backward()
            if t.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if t.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
            optimizer.step()
        if schedule is not None:
            schedule.step()
        loss_sum += loss.detach()
        frames += int(batch.feat_lens.sum())
        if progress is not None:
            progress.update(1)
        if should_stop():
            raise _Stop(index + 1, float(loss_sum))
    return float(loss_sum), frames


def decode_batches(
    model: AcousticModel,
    batches: Iterable[Any],
    task_name: str,
    device: torch.device,
    decode: Callable[[Tensor, Tensor], list[list[int]]] | None = None,
    observe: Callable[[Any, Tensor, Tensor], None] | None = None,
) -> Iterator[tuple[Any, list[list[int]], list[list[int]]]]:
    """Run ``model`` (in eval mode) over ``batches``; yield ``(batch, hypotheses, references)``.

    Args:
        decode: ``(logits, out_lens) -> hypotheses``; default the task's greedy decoder.
        observe: Called with ``(batch, logits, out_lens)`` of every batch before
            it is decoded; logits are ``(B, T', C)``.

    Validation during training and ``stagetune evaluate`` both decode and score
    through here, so their figures agree.
    """
    task = TASKS[task_name]
    decode = decode or task.decode
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        logits, out_lens = model(batch.feats, batch.feat_lens)
        if observe is not None:
            observe(batch, logits, out_lens)
        refs = task.references(batch.targets, batch.target_lens, out_lens, time_stride=model.time_stride)
        yield batch, decode(logits, out_lens), refs


@torch.no_grad()
def validate(
    model: AcousticModel, loader: Any, task_name: str, device: torch.device
) -> tuple[ErrorCounts, float]:
    """Decode ``loader`` greedily, count errors and compute the loss per unit.

    Returns:
        ``(counts, dev_loss)``: the error counts, and the task's loss summed
        over every utterance divided by the summed units
        (:meth:`Task.summed_loss`: target tokens for CTC, labelled output
        frames for the frame task), so padding and batching do not change it.
    """
    task = TASKS[task_name]
    counts = ErrorCounts()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    units = 0

    def add_loss(batch: Any, logits: Tensor, out_lens: Tensor) -> None:
        nonlocal loss_sum, units
        loss, n = task.summed_loss(
            logits, out_lens, batch.targets, batch.target_lens, time_stride=model.time_stride
        )
        loss_sum += loss.double()
        units += n

    for _, hyps, refs in decode_batches(model, loader, task_name, device, observe=add_loss):
        counts += task.errors(refs, hyps)
    return counts, float(loss_sum) / max(units, 1)


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


def _config_changes(old: Config, new: Config) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and k not in _RESUMABLE_CHANGES]


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


_EXAMPLES = 5


def _targets_in(data: DataDir, utt_ids: Sequence[str]) -> set[int]:
    """Every token id (or frame label) the utterances' targets use.

    One utterance at a time: a large corpus' frame labels need not fit in memory at once.
    """
    used: set[int] = set()
    for utt in utt_ids:
        used.update(np.unique(data.targets(utt)).tolist())
    return used


def _check_targets(corpus: Corpus, warn: Callable[[str], None]) -> None:
    """Training targets to learn from; dev targets training never shows are named.

    Raises:
        DataError: When every training transcript is empty, or (frame task) a dev
            label is beyond the classes the training labels define.
    """
    frame = corpus.train.labels is not None
    seen = _targets_in(corpus.train, corpus.train_ids)
    if not seen:
        what = "label sequences" if frame else "transcripts"
        raise DataError(
            f"{corpus.train.path}: all {len(corpus.train_ids)} training {what} are empty, so there "
            f"is nothing to learn; give training data with transcribed utterances"
        )
    unseen = sorted(_targets_in(corpus.dev, corpus.dev_ids) - seen)
    if not unseen:
        return
    symbols = corpus.token_symbols
    if frame:
        beyond = [label for label in unseen if label >= len(symbols)]
        if beyond:
            raise DataError(
                f"{corpus.dev.path}: {len(beyond)} dev labels ({', '.join(map(str, beyond[:_EXAMPLES]))}"
                f"{', ...' if len(beyond) > _EXAMPLES else ''}) are beyond the {len(symbols)} classes "
                f"0..{len(symbols) - 1} of the training labels; train on data with every class"
            )
    names = [str(i) if frame else repr(symbols[i]) for i in unseen]
    what, where = ("label", "training labels") if frame else ("token", "training transcripts")
    many = len(unseen) > 1
    warn(
        f"{len(unseen)} dev {what}{'s never occur' if many else ' never occurs'} in the {where} "
        f"({', '.join(names[:_EXAMPLES])}{', ...' if len(names) > _EXAMPLES else ''}); the model "
        f"cannot learn {'them' if many else 'it'}, so {'they count' if many else 'it counts'} as errors"
    )


def _init_from(model: AcousticModel, path: Path, log: Callable[[str], None]) -> None:
    source = load_model_file(path)
    own = model.state_dict()
    loadable = {
        k: v for k, v in source.state_dict.items() if k in own and own[k].shape == v.shape
    }
    if not loadable:
        raise UsageError(
            f"--init-from {path}: no parameter matches this model's names and shapes; "
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
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
    stop_signal: Callable[[], int | None] = lambda: None,
    owner: str | None = None,
) -> FitResult:
    """Train (or resume training of) a model in ``model_dir``.

    Re-running with the same arguments resumes from ``checkpoint.pt``; a run
    that already finished returns its stored result without training.

    Args:
        config: The resolved configuration.
        corpus: Train and dev utterances.
        model_dir: Where checkpoints, ``history.csv`` and ``model.pt`` go.
        device: Torch device (default: cuda when available).
        num_workers: DataLoader worker processes.
        callbacks: Called with every :class:`EpochResult`.
        init_from: A ``model.pt`` whose matching weights initialise the model.
        quiet: No progress bar or per-epoch lines.
        log: Where progress lines go (default: stderr unless ``quiet``).
            Warnings (``stagetune: warning: ...``) go there too, and to stderr
            even when ``quiet``.
        stop_signal: A signal the caller received before or while ``fit`` runs
            (e.g. an optim worker's SIGTERM flag); acted on like our own.
        owner: An opaque id of whom this training is for (an optim study's
            uid), stored in the checkpoint and model file; a checkpoint stored
            for another owner is refused.

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
        DataError: When every training transcript is empty, or a frame-task dev
            label is beyond the training classes.
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
    task = TASKS[config.model.task]
    symbols = corpus.token_symbols
    torch.manual_seed(t.seed)
    model = build_model(config, corpus.feat_dim, task.num_outputs(len(symbols))).to(device)
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
        ckpt = load_checkpoint(ckpt_path)
        if owner is not None and ckpt.get(OWNER_KEY) != owner:
            raise UsageError(
                f"{model_dir} holds a checkpoint trained for {ckpt.get(OWNER_KEY) or 'an unknown owner'}, "
                f"not for {owner}; use a new model directory"
            )
        changes = _config_changes(from_dict(ckpt["config"], str(ckpt_path)), config)
        if changes:
            raise UsageError(
                f"{model_dir} holds a checkpoint trained with another config ("
                + "; ".join(changes[:5])
                + "); use a new model directory, or the same config to resume"
            )
        if ckpt["feat_dim"] != corpus.feat_dim or ckpt["tokens"] != symbols:
            raise UsageError(
                f"{model_dir} holds a checkpoint trained on other data (feature dimension "
                f"{ckpt['feat_dim']}, {len(ckpt['tokens'])} output symbols; this data: "
                f"{corpus.feat_dim}, {len(symbols)}); use a new model directory, or the same "
                f"data to resume"
            )
        if ckpt.get(DATA_KEY) is None:
            written_by = ckpt.get("versions", {}).get("stagetune", "?")
            warn(
                f"checkpoint {ckpt_path} (written by stagetune {written_by}) does not record its "
                f"training data; resuming without checking that this is the same data"
            )
        else:
            change = data_change(ckpt[DATA_KEY], data, str(ckpt_path))
            if change is not None:
                raise UsageError(
                    f"{change}; use a new model directory (or remove {ckpt_path}) to start over, or "
                    f"the same data to resume"
                )
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
    # Before any feature is read or anything written: CTC cannot learn utterances
    # the time stride leaves too few output frames, and would say nothing.
    check_feasible(config, corpus)
    _check_targets(corpus, warn)
    # Statistics come from the training utterances only; a resumed run normalises
    # exactly as before, with what its checkpoint (loaded above) carries.
    if ckpt is not None:
        normalizer = stored_normalizer(
            ckpt.get("normalization"), config.data.normalization, corpus.train, str(ckpt_path)
        )
    else:
        normalizer = fit_normalizer(config.data.normalization, corpus.train, corpus.train_ids, log=log)
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
    )
    dev_sampler = BucketBatchSampler(dev_set.lengths, config.data.batch_size, shuffle=False)
    dev_loader = _loader(dev_set, list(dev_sampler), num_workers, device)

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
                "state": state,
                "versions": versions(),
            },
            ckpt_path,
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
                    should_stop=lambda: signals.received is not None or stop_signal() is not None,
                    progress=bar,
                    schedule=scheduler,
                    start_loss_sum=state["loss_sum"],
                )
            except _Stop as stop:
                signals.acted = True
                bar.close()
                state["batch"], state["loss_sum"] = stop.batches_done, stop.loss_sum
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
            counts, dev_loss = validate(model, dev_loader, config.model.task, device)
            seconds = time.perf_counter() - started
            dev_error = counts.rate
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
            )
            state["history"].append(result.row())
            state["epoch"], state["batch"], state["loss_sum"] = epoch, 0, 0.0
            _write_history(model_dir / HISTORY_NAME, state["history"])
            log(
                f"epoch {epoch}/{t.num_epochs}: train loss {result.train_loss:.4f}, "
                f"dev error {dev_error:.2%}{' (best)' if best else ''}, dev loss {dev_loss:.4f}, "
                f"lr {lr:.3g}, {seconds:.1f} s"
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
        },
    )
    return _result(state, model_dir, resumed_from)


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
