"""Decode a data dir with a trained model and score it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stagetune.checkpoint import load_model_file
from stagetune.errors import DataError, UsageError
from stagetune.dataset import BucketBatchSampler, UtteranceDataset, collate
from stagetune.kaldi import TokenTable, load_data_dir
from stagetune.metrics import ErrorCounts, ctc_prefix_beam_search
from stagetune.model import TASKS, build_model
from stagetune.normalize import stored_normalizer
from stagetune.training import decode_batches

__all__ = ["Evaluation", "evaluate_model"]


@dataclass
class Evaluation:
    """Error counts and hypotheses (utterance id -> output symbols)."""

    counts: ErrorCounts
    hypotheses: dict[str, list[str]]
    task: str

    def text(self) -> str:
        """Hypotheses in Kaldi ``text`` format, sorted by utterance id."""
        return "".join(f"{u} {' '.join(h)}".rstrip() + "\n" for u, h in sorted(self.hypotheses.items()))


@torch.no_grad()
def evaluate_model(
    model_path: str | Path,
    data_dir: str | Path,
    *,
    device: torch.device,
    beam_width: int = 0,
    batch_size: int = 32,
) -> Evaluation:
    """Score ``model_path`` on ``data_dir``.

    Features are normalised as in training: with the global statistics stored in
    the model file (never recomputed on ``data_dir``), the speaker statistics of
    ``data_dir``'s own ``cmvn.scp``, per utterance, or not at all.

    Args:
        model_path: A ``model.pt`` written by ``stagetune train``.
        data_dir: Kaldi data dir with features and references.
        device: Torch device.
        beam_width: CTC prefix beam search width; 0 or 1 decodes greedily.
        batch_size: Utterances per decoding batch.
    """
    mf = load_model_file(model_path)
    task_name = mf.config.model.task
    task = TASKS[task_name]
    tokens = TokenTable(mf.tokens) if task_name == "ctc" else None
    data = load_data_dir(data_dir, task=task_name, tokens=tokens)
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
    dataset = UtteranceDataset(data, data.utt_ids, normalizer=normalizer)
    batches = (
        collate([dataset[i] for i in indices])
        for indices in BucketBatchSampler(dataset.lengths, batch_size, shuffle=False)
    )

    def beam_search(logits: torch.Tensor, out_lens: torch.Tensor) -> list[list[int]]:
        log_probs = logits.float().log_softmax(-1).cpu().numpy()
        return [
            ctc_prefix_beam_search(log_probs[i, : out_lens[i]], beam_width=beam_width)
            for i in range(len(log_probs))
        ]

    decode = beam_search if task_name == "ctc" and beam_width > 1 else None
    counts = ErrorCounts()
    hypotheses: dict[str, list[str]] = {}
    for batch, hyps, refs in decode_batches(model, batches, task_name, device, decode):
        counts += task.errors(refs, hyps)
        for utt, hyp in zip(batch.utt_ids, hyps):
            hypotheses[utt] = [mf.tokens[i] for i in hyp] if tokens is not None else [str(i) for i in hyp]
    return Evaluation(counts=counts, hypotheses=hypotheses, task=task_name)
