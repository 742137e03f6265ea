"""``stagetune extract``: what a trained model computes for each utterance, written for Kaldi tools.

Two levels:

* ``utterance``: one vector per utterance.  A model of task ``utt`` gives its
  embedding (the pooled layer before the classes: x-vector-style speaker
  embeddings); any other model the mean of its encoder states over the
  utterance's output frames.
* ``frame``: the encoder's states, one row per output frame (after the time
  strides): a ``(T', H)`` matrix per utterance.

Formats: ``ark`` writes ``OUT.ark`` and ``OUT.scp`` (kaldiio; Kaldi's
``copy-vector``/``copy-matrix`` read them), ``txt`` a text archive
(``ark,t``), ``pt`` a ``torch.save`` dict ``utterance id -> tensor``.
Features are normalised as in training; no label file is needed.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import kaldiio
import numpy as np
import torch

from stagetune.errors import StagetuneError, UsageError
from stagetune.evaluate import load_inference

__all__ = ["FORMATS", "LEVELS", "extract", "iter_outputs"]

FORMATS = ("ark", "txt", "pt")
LEVELS = ("utterance", "frame")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path``, renamed to ``path`` once the block succeeds, else removed.

    Raises:
        StagetuneError: The file cannot be written (one line naming it).
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        tmp.replace(path)
    except OSError as exc:
        raise StagetuneError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. under a path that is not a directory: the error above says it
            pass


@torch.no_grad()
def iter_outputs(
    model_path: str | Path, data_dir: str | Path, *, level: str, device: torch.device, batch_size: int = 32
) -> Iterator[tuple[str, np.ndarray]]:
    """``(utterance id, float32 vector or (T', H) matrix)`` for every utterance of ``data_dir``."""
    if level not in LEVELS:
        raise UsageError(f"--level {level!r}: choose one of {', '.join(LEVELS)}")
    loaded = load_inference(model_path, data_dir, device, targets=False)
    model = loaded.model
    embed = getattr(model.output, "embed", None)
    for batch in loaded.batches(batch_size):
        batch = batch.to(device)
        states, out_lens = model.encode(batch.feats, batch.feat_lens)
        if level == "frame":
            for utt, matrix, length in zip(batch.utt_ids, states, out_lens.tolist()):
                yield utt, matrix[:length].float().cpu().numpy()
            continue
        if embed is not None:
            vectors = embed(states, out_lens)
        else:
            mask = torch.arange(states.size(1), device=states.device) < out_lens.unsqueeze(1)
            vectors = (states * mask.unsqueeze(-1)).sum(1) / out_lens.clamp(min=1).unsqueeze(1)
        for utt, vector in zip(batch.utt_ids, vectors.float().cpu().numpy()):
            yield utt, vector


def extract(
    model_path: str | Path, data_dir: str | Path, out: str | Path, *, fmt: str = "ark", level: str = "utterance",
    device: torch.device, batch_size: int = 32,
) -> list[Path]:
    """Write the outputs of :func:`iter_outputs` to ``out`` in format ``fmt``; returns the files written.

    ``ark`` writes ``OUT.ark`` and ``OUT.scp`` (``out`` without a suffix, or with
    ``.ark``); the others write ``out`` itself.  Nothing is left half-written: each
    file appears under its name only once complete.
    """
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    outputs = sorted(iter_outputs(model_path, data_dir, level=level, device=device, batch_size=batch_size))
    if fmt == "pt":
        with atomic_path(out) as tmp:
            torch.save({utt: torch.from_numpy(value) for utt, value in outputs}, tmp)
        return [out]
    if fmt == "txt":
        with atomic_path(out) as tmp:
            with kaldiio.WriteHelper(f"ark,t:{tmp}") as writer:
                for utt, value in outputs:
                    writer(utt, value)
        return [out]
    stem = out.with_suffix("") if out.suffix == ".ark" else out
    ark, scp = stem.with_name(stem.name + ".ark"), stem.with_name(stem.name + ".scp")
    with ExitStack() as stack:
        tmp_ark, tmp_scp = stack.enter_context(atomic_path(ark)), stack.enter_context(atomic_path(scp))
        with kaldiio.WriteHelper(f"ark,scp:{tmp_ark},{tmp_scp}") as writer:
            for utt, value in outputs:
                writer(utt, value)
        # The scp must name the ark's final path, not the temporary one.
        text = tmp_scp.read_text(encoding="utf-8").replace(str(tmp_ark), str(ark.absolute()))
        tmp_scp.write_text(text, encoding="utf-8")
    return [ark, scp]
