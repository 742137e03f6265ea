"""Speaker verification scoring: cosine scores over a trials list, equal error rate and minDCF.

A trials file has one trial per line, either ``LABEL UTT_A UTT_B`` with label
1 (same speaker, a *target* trial) or 0, as in VoxCeleb's lists, or Kaldi's
``UTT_A UTT_B target|nontarget``.  Scores are cosine similarities of the two
utterances' embeddings (``stagetune extract``).

* **EER**: the rate at the threshold where the miss rate (targets scored below
  it) equals the false-alarm rate (non-targets at or above it); between the two
  consecutive operating points where false alarms overtake misses, the crossing
  is interpolated linearly (no convex hull of the ROC).
* **minDCF**: ``min over thresholds of C_miss P_miss p + C_fa P_fa (1 - p)``,
  normalised by ``min(C_miss p, C_fa (1 - p))``, the cost of the better of
  accepting or rejecting everything (NIST SRE's normalised detection cost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from stagetune.errors import DataError
from stagetune.kaldi_io import read_table

__all__ = ["Trial", "read_trials", "cosine_scores", "equal_error_rate", "min_dcf", "VerificationResult", "score"]

_LABELS = {"1": True, "0": False, "target": True, "nontarget": False}


@dataclass(frozen=True)
class Trial:
    target: bool
    enrol: str
    test: str


def read_trials(path: str | Path) -> list[Trial]:
    """Trials of ``LABEL A B`` or ``A B target|nontarget`` lines.

    Raises:
        DataError: A line of neither form (naming file and line), or no target or
            no non-target trial (neither rate would be defined).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: trials file does not exist")
    trials = []
    for lineno, fields in read_table(path):
        if len(fields) == 3 and fields[0] in ("0", "1"):
            trials.append(Trial(_LABELS[fields[0]], fields[1], fields[2]))
        elif len(fields) == 3 and fields[2] in ("target", "nontarget"):
            trials.append(Trial(_LABELS[fields[2]], fields[0], fields[1]))
        else:
            raise DataError(
                f"{path} line {lineno}: expected `1|0 UTT_A UTT_B` or `UTT_A UTT_B target|nontarget`, "
                f"got {' '.join(fields)!r}"
            )
    if not any(t.target for t in trials) or all(t.target for t in trials):
        raise DataError(f"{path}: needs both target and non-target trials, got {len(trials)} trials of one kind")
    return trials


def cosine_scores(embeddings: Mapping[str, np.ndarray], trials: Sequence[Trial], where: str = "embeddings") -> np.ndarray:
    """The cosine similarity of each trial's two embeddings.

    Raises:
        DataError: A trial names an utterance without an embedding.
    """
    missing = sorted({u for t in trials for u in (t.enrol, t.test) if u not in embeddings})
    if missing:
        raise DataError(
            f"{where}: no embedding for {len(missing)} utterance(s) of the trials, e.g. {missing[0]!r}; "
            "extract embeddings of every utterance the trials name"
        )
    unit = {}
    for utt in {u for t in trials for u in (t.enrol, t.test)}:
        vector = np.asarray(embeddings[utt], dtype=np.float64).reshape(-1)
        unit[utt] = vector / max(np.linalg.norm(vector), 1e-12)
    return np.array([float(unit[t.enrol] @ unit[t.test]) for t in trials])


def _rates(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Miss and false-alarm rates at every distinct threshold (accept: score >= threshold).

    Thresholds run from above the highest score (accept nothing) down to the
    lowest score (accept everything).
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    targets, nontargets = labels.sum(), (~labels).sum()
    # Accepting the first k trials for k = 0..n; only k at the end of a run of equal scores.
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    k = np.r_[0, np.flatnonzero(last_of_run) + 1]
    hits = np.r_[0, np.cumsum(sorted_labels)][k]
    false_alarms = np.r_[0, np.cumsum(~sorted_labels)][k]
    thresholds = np.r_[np.inf, sorted_scores[k[1:] - 1]]
    return (targets - hits) / targets, false_alarms / nontargets, thresholds


def equal_error_rate(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The EER of ``scores`` for trials that are targets where ``labels`` is true."""
    miss, fa, _ = _rates(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool))
    # miss falls and fa rises along the thresholds: find where fa - miss changes sign.
    diff = fa - miss
    i = int(np.flatnonzero(diff >= 0)[0])
    if diff[i] == 0 or i == 0:
        return float(fa[i])
    # Interpolate between operating points i - 1 (fa < miss) and i (fa >= miss).
    w = -diff[i - 1] / (diff[i] - diff[i - 1])
    return float(miss[i - 1] + w * (miss[i] - miss[i - 1]))


def min_dcf(
    scores: Sequence[float], labels: Sequence[bool], *, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> float:
    """The normalised minimum detection cost (see the module docstring)."""
    if not 0 < p_target < 1:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    miss, fa, _ = _rates(np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool))
    cost = c_miss * miss * p_target + c_fa * fa * (1 - p_target)
    return float(cost.min() / min(c_miss * p_target, c_fa * (1 - p_target)))


@dataclass(frozen=True)
class VerificationResult:
    eer: float
    min_dcf: float
    p_target: float
    targets: int
    nontargets: int
    scores: np.ndarray

    def text(self) -> str:
        return (
            f"EER {self.eer:.2%}, minDCF(p={self.p_target:g}) {self.min_dcf:.4f} on {self.targets} target "
            f"and {self.nontargets} non-target trials"
        )


def score(embeddings: Mapping[str, np.ndarray], trials: Sequence[Trial], *, p_target: float = 0.01,
          where: str = "embeddings") -> VerificationResult:
    """Cosine-score ``trials`` and summarise them."""
    scores = cosine_scores(embeddings, trials, where)
    labels = np.array([t.target for t in trials])
    return VerificationResult(
        equal_error_rate(scores, labels), min_dcf(scores, labels, p_target=p_target), p_target,
        int(labels.sum()), int((~labels).sum()), scores,
    )
