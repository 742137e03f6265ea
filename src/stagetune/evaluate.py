"""Decode a data dir with a trained model and score it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import kaldiio
import numpy as np
import torch

from stagetune.checkpoint import load_model_file
from stagetune.errors import DataError, UsageError
from stagetune.dataset import Batch, BucketBatchSampler, UtteranceDataset, collate
from stagetune.kaldi import DataDir, TokenTable, load_data_dir, regression_dim
from stagetune.metrics import ErrorCounts, TaskScore, ctc_prefix_beam_search
from stagetune.model import AcousticModel, build_model
from stagetune.tasks import MultiTask, RegressionTask, Task, task_of
from stagetune.normalize import stored_normalizer
from stagetune.plugins import target_format

__all__ = ["Evaluation", "Inference", "evaluate_model", "load_inference", "write_predictions"]


@dataclass
class Evaluation:
    """Error counts and hypotheses (utterance id -> output symbols)."""

    counts: ErrorCounts
    hypotheses: dict[str, list[str]]
    task: str
    #: The task's name of the error rate (TER, FER, UER).
    error_name: str = "TER"
    #: All the task's figures (:meth:`Task.scorer`); ``score.figures`` is empty for
    #: tasks whose figure is the error rate of ``counts``.
    score: TaskScore = field(default_factory=lambda: TaskScore(0.0))
    #: Regression predictions (utterance id -> float32 ``(T', D)``, one row per output
    #: frame, in the targets' units) when asked for (``--out`` of ``regress``, and of
    #: ``multi`` driven by ``regress``); None when the outputs written are :attr:`hypotheses`.
    predictions: dict[str, np.ndarray] | None = None

    def text(self) -> str:
        """Hypotheses in Kaldi ``text`` format, sorted by utterance id."""
        return "".join(f"{u} {' '.join(h)}".rstrip() + "\n" for u, h in sorted(self.hypotheses.items()))


def write_predictions(path: Path, predictions: dict[str, np.ndarray]) -> None:
    """Write ``predictions`` to ``path`` as a binary Kaldi archive of float32 matrices, sorted by
    utterance id (``kaldiio.load_ark``, Kaldi's ``copy-matrix ark:PATH``), through a temporary
    file, so that ``path`` is whole or absent.

    Raises:
        StagetuneError: The file cannot be written (one line naming it).
    """
    from stagetune.extract import atomic_path  # extract imports this module

    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as handle:
            kaldiio.save_ark(handle, {u: np.asarray(m, dtype=np.float32) for u, m in sorted(predictions.items())})


@dataclass
class Inference:
    """A trained model ready to run on a data dir, features normalised as in training."""

    model_file: Any
    task: Task
    model: AcousticModel
    data: DataDir
    dataset: UtteranceDataset

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """The data dir's utterances in batches of similar length."""
        for indices in BucketBatchSampler(self.dataset.lengths, batch_size, shuffle=False):
            yield collate([self.dataset[i] for i in indices])


def load_inference(
    model_path: str | Path, data_dir: str | Path, device: torch.device, *, targets: bool = True
) -> Inference:
    """Load ``model_path`` (in eval mode, on ``device``) and ``data_dir``, with its references
    unless ``targets`` is False (features only).

    Features are normalised as in training: with the global statistics stored in
    the model file (never recomputed on ``data_dir``), the speaker statistics of
    ``data_dir``'s own ``cmvn.scp``, per utterance, or not at all.
    """
    mf = load_model_file(model_path)
    task_name = mf.config.model.task
    task = task_of(mf.config)
    targets_as = target_format(task_name)  # a task plugin reads a built-in task's label files
    tokens = TokenTable(mf.tokens) if targets_as == "ctc" else None
    classes = mf.tokens if targets_as == "utt" else None
    data = load_data_dir(data_dir, task=task_name, tokens=tokens, classes=classes, targets=targets)
    if targets and data.values is not None:
        _check_targets_fit(data, list(mf.tokens), str(model_path))
    if data.feat_dim != mf.feat_dim:
        raise UsageError(
            f"{data_dir}: features have dimension {data.feat_dim}, the model expects "
            f"{mf.feat_dim}; compute them with the same `stagetune prep` options"
        )
    model = build_model(mf.config, mf.feat_dim, task.num_outputs(len(mf.tokens)))
    model.load_state_dict(mf.state_dict)
    model.to(device)
    normalizer = stored_normalizer(
        mf.extra.get("normalization"), mf.config.data.normalization, data, str(model_path)
    )
    if normalizer.mode == "speaker" and data.cmvn is None:
        raise DataError(
            f"{data.path / 'cmvn.scp'} is missing; {model_path} was trained with per-speaker "
            "normalisation: compute it (`stagetune prep`, or Kaldi steps/compute_cmvn_stats.sh)"
        )
    model.eval()
    dataset = UtteranceDataset(data, data.utt_ids, normalizer=normalizer)
    return Inference(mf, task, model, data, dataset)



def _check_targets_fit(data: DataDir, symbols: list[str], model_path: str) -> None:
    """Regression (and multitask) targets of the dimension, and labels of the classes, the model has."""
    dims = regression_dim(symbols)
    if data.target_dim != dims:
        raise DataError(
            f"{data.path}: regression targets have {data.target_dim} dimensions, {model_path} "
            f"predicts {dims}; give targets like the training ones"
        )
    classes = len(symbols) - dims
    if data.labels is not None:
        beyond = next((u for u in data.utt_ids if int(data.labels[u].max(initial=0)) >= classes), None)
        if beyond is not None:
            raise DataError(
                f"{data.path / 'utt2label'}: utterance {beyond!r} has label "
                f"{int(data.labels[beyond].max())}, beyond the {classes} classes of {model_path}"
            )


@torch.no_grad()
def evaluate_model(
    model_path: str | Path,
    data_dir: str | Path,
    *,
    device: torch.device,
    beam_width: int = 0,
    batch_size: int = 32,
    hypotheses: bool = False,
) -> Evaluation:
    """Score ``model_path`` on ``data_dir``.

    Features are normalised as in training (:func:`load_inference`).

    Args:
        model_path: A ``model.pt`` written by ``stagetune train``.
        data_dir: Kaldi data dir with features and references.
        device: Torch device.
        beam_width: CTC prefix beam search width; 0 or 1 decodes greedily.
        batch_size: Utterances per decoding batch.
        hypotheses: The caller writes the outputs (``--out``): symbol hypotheses
            (:attr:`Evaluation.hypotheses`), or for ``regress`` the predictions
            (:attr:`Evaluation.predictions`); ``multi`` gives those of its driving
            sub-task (``training.main_task``) as that task would.  Another task
            without either is refused before decoding.
    """
    loaded = load_inference(model_path, data_dir, device)
    mf, task, model, task_name = loaded.model_file, loaded.task, loaded.model, loaded.model_file.config.model.task
    writer = task  # the task whose outputs --out writes
    if hypotheses and isinstance(task, MultiTask):
        writer = task.driving
    values = hypotheses and isinstance(writer, RegressionTask)
    if hypotheses and not (writer.hypotheses or values):
        raise UsageError(f"--out: task {task_name!r} has no symbol hypotheses to write; leave out --out")
    symbolic = target_format(task_name) in ("ctc", "utt")  # hypotheses as tokens or class names, not ids
    batches = loaded.batches(batch_size)

    def beam_search(logits: torch.Tensor, out_lens: torch.Tensor) -> list[list[int]]:
        log_probs = logits.float().log_softmax(-1).cpu().numpy()
        return [
            ctc_prefix_beam_search(log_probs[i, : out_lens[i]], beam_width=beam_width)
            for i in range(len(log_probs))
        ]

    decode = beam_search if task_name == "ctc" and beam_width > 1 else None
    # The scorer validation uses, so evaluate's figures agree with the dev figures of training.
    scorer = task.scorer(model.time_stride, decode)
    written: dict[str, list[str]] = {}
    predictions: dict[str, np.ndarray] | None = {} if values else None
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        logits, out_lens = model(batch.feats, batch.feat_lens)
        hyps = scorer.add(logits, out_lens, batch.targets, batch.target_lens)
        outputs = logits
        if writer is not task:  # multitask --out: the driving sub-task's share, decoded as that task
            outputs = task.main_outputs(logits, regression_dim(mf.tokens))  # type: ignore[attr-defined]
            hyps = None if values else writer.decode(outputs, out_lens)
        if predictions is not None:  # the head's outputs are in the targets' units
            rows = outputs.detach().float().cpu().numpy()
            for utt, matrix, length in zip(batch.utt_ids, rows, out_lens.tolist()):
                predictions[utt] = matrix[:length]
        for utt, hyp in zip(batch.utt_ids, hyps or ()):
            written[utt] = [mf.tokens[i] for i in hyp] if symbolic else [str(i) for i in hyp]
    score = scorer.result()
    return Evaluation(
        counts=score.counts, hypotheses=written, task=task_name, error_name=task.error_name, score=score,
        predictions=predictions,
    )
