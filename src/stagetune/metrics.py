"""Error counts, edit distance and CTC decoding (numpy / pure Python, no torch).

:class:`ErrorCounts` is what validation reports: substitutions, deletions and
insertions against a reference, summed over utterances, so that a corpus error
rate is ``sum(errors) / sum(ref_length)`` and never a mean of per-utterance rates.

The CTC helpers work on one utterance's ``(T, C)`` score matrix; the batched
torch decoder in :mod:`stagetune.model` reuses :func:`ctc_collapse` so the
collapse rule lives in one place.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ErrorCounts",
    "edit_distance",
    "ctc_collapse",
    "ctc_greedy_decode",
    "ctc_sequence_log_prob",
    "ctc_prefix_beam_search",
    "concordance_correlation",
    "RegressionStats",
    "TaskScore",
]


@dataclass
class ErrorCounts:
    """Edit operations against a reference, summable over utterances.

    Attributes:
        substitutions: Reference symbols replaced by another symbol.
        deletions: Reference symbols missing from the hypothesis.
        insertions: Hypothesis symbols with no reference counterpart.
        ref_length: Number of reference symbols (the rate's denominator).
        utterances: Number of utterances counted.
    """

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    ref_length: int = 0
    utterances: int = 0

    def __add__(self, other: object) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.ref_length + other.ref_length,
            self.utterances + other.utterances,
        )

    def __radd__(self, other: object) -> ErrorCounts:
        # Lets ``sum(counts)`` start from the integer 0.
        if other == 0:
            return ErrorCounts() + self
        return NotImplemented

    def __iadd__(self, other: object) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        self.substitutions += other.substitutions
        self.deletions += other.deletions
        self.insertions += other.insertions
        self.ref_length += other.ref_length
        self.utterances += other.utterances
        return self

    @property
    def errors(self) -> int:
        """Substitutions + deletions + insertions."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def rate(self) -> float:
        """``errors / ref_length``.

        With an empty reference (``ref_length == 0``) the rate is ``0.0`` when
        there are no errors and ``math.inf`` otherwise: any insertion against
        nothing is infinitely bad, and an optimizer minimising the rate then
        never prefers such a result.
        """
        if self.ref_length == 0:
            return 0.0 if self.errors == 0 else math.inf
        return self.errors / self.ref_length

    def as_dict(self) -> dict[str, Any]:
        """The counts plus the derived ``errors`` and ``rate``, for logs and trial attributes."""
        data: dict[str, Any] = asdict(self)
        data["errors"] = self.errors
        data["rate"] = self.rate
        return data

    def describe(self, name: str = "TER") -> str:
        """E.g. ``"TER 12.34% (S=3 D=1 I=0, N=32)"``; ``name`` may be ``"FER"`` etc."""
        return (
            f"{name} {100.0 * self.rate:.2f}% (S={self.substitutions} D={self.deletions} "
            f"I={self.insertions}, N={self.ref_length})"
        )

    def __str__(self) -> str:
        return self.describe()


def edit_distance(ref: Sequence[Any], hyp: Sequence[Any]) -> ErrorCounts:
    """Levenshtein alignment of ``hyp`` against ``ref`` with S/D/I counts.

    Every operation costs 1.  The returned counts come from one minimal
    alignment found by backtracing from the end; where several moves lie on a
    minimal path, the backtrace prefers the diagonal (match or substitution),
    then a deletion, then an insertion.  So ``("a b", "b c")`` counts two
    substitutions rather than one deletion plus one insertion.  The total
    ``errors`` is the same for every minimal alignment.

    Args:
        ref: Reference symbols (any values comparable with ``==``).
        hyp: Hypothesis symbols.

    Returns:
        Counts for one utterance (``utterances == 1``, ``ref_length == len(ref)``).
    """
    n, m = len(ref), len(hyp)
    # cost[i][j]: edits turning ref[:i] into hyp[:j].
    cost = [[0] * (m + 1) for _ in range(n + 1)]
    for j in range(m + 1):
        cost[0][j] = j
    for i in range(1, n + 1):
        row, prev = cost[i], cost[i - 1]
        row[0] = i
        r = ref[i - 1]
        for j in range(1, m + 1):
            diagonal = prev[j - 1] + (r != hyp[j - 1])
            row[j] = min(diagonal, prev[j] + 1, row[j - 1] + 1)
    subs = dels = ins = 0
    i, j = n, m
    while i > 0 or j > 0:
        here = cost[i][j]
        if i > 0 and j > 0 and here == cost[i - 1][j - 1] + (ref[i - 1] != hyp[j - 1]):
            subs += ref[i - 1] != hyp[j - 1]
            i, j = i - 1, j - 1
        elif i > 0 and here == cost[i - 1][j] + 1:
            dels += 1
            i -= 1
        else:
            ins += 1
            j -= 1
    return ErrorCounts(subs, dels, ins, ref_length=n, utterances=1)


def ctc_collapse(ids: Sequence[int], blank: int = 0) -> list[int]:
    """Collapse a frame-level CTC path to labels: merge repeats, then drop blanks.

    ``[0, 1, 1, 0, 1, 2, 2] -> [1, 1, 2]`` (a blank separates the two 1s).
    """
    labels: list[int] = []
    previous = None
    for symbol in ids:
        symbol = int(symbol)
        if symbol != previous and symbol != blank:
            labels.append(symbol)
        previous = symbol
    return labels


def ctc_greedy_decode(scores: np.ndarray | Sequence[Sequence[float]], blank: int = 0) -> list[int]:
    """Best-path CTC decoding of one utterance.

    Args:
        scores: ``(T, C)`` log-probabilities, probabilities or logits (only
            the per-frame argmax matters).
        blank: Index of the blank symbol.

    Returns:
        The label sequence of the most likely frame path.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (T, C), got {scores.shape}")
    return ctc_collapse(scores.argmax(axis=-1).tolist(), blank)


def ctc_sequence_log_prob(
    log_probs: np.ndarray | Sequence[Sequence[float]], labels: Sequence[int], blank: int = 0
) -> float:
    """Exact ``log P(labels | log_probs)`` under CTC: the sum over all frame paths.

    The forward recursion over the blank-extended label sequence, vectorised
    over its ``2 * len(labels) + 1`` states.

    Args:
        log_probs: ``(T, C)`` per-frame log-probabilities.
        labels: Label sequence (no blanks).
        blank: Index of the blank symbol.

    Returns:
        The log-probability; ``-inf`` where no path yields ``labels``.
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must have shape (T, C), got {log_probs.shape}")
    if len(log_probs) == 0:
        return 0.0 if len(labels) == 0 else -math.inf
    ext = np.full(2 * len(labels) + 1, blank, dtype=np.int64)
    ext[1::2] = labels
    # A state may skip the blank before it unless it repeats the previous label.
    can_skip = np.zeros(len(ext), dtype=bool)
    can_skip[2:] = (ext[2:] != blank) & (ext[2:] != ext[:-2])
    alpha = np.full(len(ext), -np.inf)
    alpha[:2] = log_probs[0, ext[:2]]
    step = np.full(len(ext), -np.inf)
    skip = np.full(len(ext), -np.inf)
    for frame in log_probs[1:]:
        step[1:] = alpha[:-1]
        skip[2:] = np.where(can_skip[2:], alpha[:-2], -np.inf)
        alpha = np.logaddexp(np.logaddexp(alpha, step), skip) + frame[ext]
    return float(np.logaddexp.reduce(alpha[-2:]))


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    high, low = (a, b) if a > b else (b, a)
    return high + math.log1p(math.exp(low - high))


def ctc_prefix_beam_search(
    log_probs: np.ndarray | Sequence[Sequence[float]], beam_width: int = 8, blank: int = 0
) -> list[int]:
    """CTC prefix beam search without a language model.

    Each prefix keeps two log-probabilities: of paths ending in blank and of
    paths ending in its last label; extending a prefix by its own last label
    only continues from the blank-ending paths.  After every frame the
    ``beam_width`` prefixes of highest total probability survive.

    Per frame only the ``beam_width + 1`` most likely labels are tried as
    extensions (plus extensions leading to prefixes already in the beam): any
    other extension of a prefix is beaten by ``beam_width`` distinct extensions
    of the same prefix, so this changes no result and keeps the cost
    ``O(T * beam_width**2)`` instead of ``O(T * beam_width * C)``.

    Finally the surviving prefixes and the greedy (best-path) hypothesis are
    rescored with their exact probability (:func:`ctc_sequence_log_prob`) and
    the best is returned.  Pruning by prefix probability can drop the greedy
    hypothesis on its way (it happens in about 1-2% of random peaky
    distributions even with a beam of 32), so without this step the beam
    result could be less probable than the greedy one; with it, it never is.

    Args:
        log_probs: ``(T, C)`` per-frame log-probabilities (log-softmax output).
        beam_width: Number of prefixes kept per frame (>= 1).
        blank: Index of the blank symbol.

    Returns:
        The most probable label sequence found.
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    if log_probs.ndim != 2:
        raise ValueError(f"log_probs must have shape (T, C), got {log_probs.shape}")
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    num_frames, num_symbols = log_probs.shape
    if not 0 <= blank < num_symbols:
        raise ValueError(f"blank must be in [0, {num_symbols}), got {blank}")
    labels = np.array([c for c in range(num_symbols) if c != blank], dtype=np.int64)
    # prefix -> (log P(paths ending in blank), log P(paths ending in a label))
    beam: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, -math.inf)}
    for t in range(num_frames):
        frame = log_probs[t].tolist()
        top = labels[np.argsort(-log_probs[t, labels], kind="stable")[: beam_width + 1]].tolist()
        children: dict[tuple[int, ...], set[int]] = {}
        for prefix in beam:
            if prefix:
                children.setdefault(prefix[:-1], set()).add(prefix[-1])
        new: dict[tuple[int, ...], tuple[float, float]] = {}
        for prefix, (p_blank, p_label) in beam.items():
            total = _logaddexp(p_blank, p_label)
            _accumulate(new, prefix, total + frame[blank], -math.inf)
            last = prefix[-1] if prefix else None
            if last is not None:
                # Repeating the last label without a blank in between stays in the prefix.
                _accumulate(new, prefix, -math.inf, p_label + frame[last])
            for c in sorted(set(top) | children.get(prefix, set())):
                source = p_blank if c == last else total
                _accumulate(new, prefix + (c,), -math.inf, source + frame[c])
        ranked = sorted(new.items(), key=lambda item: -_logaddexp(*item[1]))
        beam = dict(ranked[:beam_width])
    candidates = list(beam)
    greedy = tuple(ctc_greedy_decode(log_probs, blank))
    if greedy not in beam:
        candidates.append(greedy)
    # max() keeps the first of equals: the beam's own order, then greedy.
    best = max(candidates, key=lambda prefix: ctc_sequence_log_prob(log_probs, prefix, blank))
    return list(best)


def _accumulate(
    beam: dict[tuple[int, ...], tuple[float, float]],
    prefix: tuple[int, ...],
    blank_part: float,
    label_part: float,
) -> None:
    """Add path probabilities (log space) to ``prefix``'s entry in ``beam``."""
    p_blank, p_label = beam.get(prefix, (-math.inf, -math.inf))
    beam[prefix] = (_logaddexp(p_blank, blank_part), _logaddexp(p_label, label_part))


def concordance_correlation(x: Any, y: Any) -> float:
    """Lin's (1989) concordance correlation coefficient of two equally long series.

    ``2 cov(x, y) / (var(x) + var(y) + (mean(x) - mean(y))^2)``, with population
    (``1/n``) moments.  1 is perfect agreement, 0 none, -1 perfect reversal;
    unlike Pearson's correlation it also penalises an offset or a wrong scale.
    Two identical constant series agree perfectly (1.0); a constant prediction
    of a varying target scores 0.

    Raises:
        ValueError: If the series differ in length or are empty.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(x) != len(y) or not len(x):
        raise ValueError(f"need two equally long non-empty series, got {len(x)} and {len(y)} values")
    stats = RegressionStats()
    stats.add(x[:, None], y[:, None])
    return float(stats.ccc_per_dim()[0])


@dataclass
class RegressionStats:
    """Sums of predictions ``x`` against references ``y``, per target dimension, summable over batches.

    From these, :meth:`mse` and the concordance correlation coefficient
    (:meth:`ccc`) of everything added, as if computed over all frames at once.
    """

    count: int = 0
    sum_x: np.ndarray | None = None
    sum_y: np.ndarray | None = None
    sum_xx: np.ndarray | None = None
    sum_yy: np.ndarray | None = None
    sum_xy: np.ndarray | None = None
    sum_sq_error: np.ndarray | None = None

    def add(self, x: Any, y: Any) -> None:
        """Add ``(N, D)`` predictions ``x`` and references ``y`` (N frames)."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if x.shape != y.shape or x.ndim != 2:
            raise ValueError(f"predictions {x.shape} and references {y.shape} must both be (N, D)")
        sums = (x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0), ((x - y) ** 2).sum(0))
        names = ("sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy", "sum_sq_error")
        if self.sum_x is not None and len(self.sum_x) != x.shape[1]:
            raise ValueError(f"{x.shape[1]} target dimensions after {len(self.sum_x)}")
        for name, value in zip(names, sums):
            old = getattr(self, name)
            setattr(self, name, value if old is None else old + value)
        self.count += x.shape[0]

    def mse(self) -> float:
        """Mean squared error over every frame and dimension (nan when empty)."""
        if not self.count:
            return math.nan
        return float(self.sum_sq_error.sum() / (self.count * len(self.sum_sq_error)))

    def ccc_per_dim(self) -> np.ndarray:
        """The concordance correlation coefficient of each dimension (nan when empty)."""
        if not self.count:
            return np.full(0 if self.sum_x is None else len(self.sum_x), math.nan)
        n = self.count
        mean_x, mean_y = self.sum_x / n, self.sum_y / n
        var_x = np.maximum(self.sum_xx / n - mean_x**2, 0.0)
        var_y = np.maximum(self.sum_yy / n - mean_y**2, 0.0)
        cov = self.sum_xy / n - mean_x * mean_y
        denominator = var_x + var_y + (mean_x - mean_y) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            ccc = np.where(denominator > 0, 2 * cov / np.where(denominator > 0, denominator, 1.0), 1.0)
        return ccc

    def ccc(self) -> float:
        """The per-dimension concordance correlation coefficients, averaged (nan when empty)."""
        per_dim = self.ccc_per_dim()
        return float(per_dim.mean()) if len(per_dim) else math.nan


@dataclass
class TaskScore:
    """A task's figures over a data set: what validation and ``stagetune evaluate`` report.

    Attributes:
        error: The figure training minimises (``dev_error``: model selection,
            learning-rate plateaus, early stopping, optim), lower is better:
            the error rate of counted tasks, 1 - CCC for regression.
        counts: Edit-distance counts (empty for tasks that do not count errors).
        figures: The task's own named figures (e.g. ``{"mse": ..., "ccc": ...}``),
            ``history.csv`` columns ``dev_NAME``; empty for counted tasks,
            whose figure is ``counts.rate``.
        units: What the figures are over, e.g. ``"123 output frames, D=1"``.
    """

    error: float
    counts: ErrorCounts = field(default_factory=ErrorCounts)
    figures: dict[str, float] = field(default_factory=dict)
    units: str = ""

    def describe(self) -> str:
        """E.g. ``"MSE 0.0123 CCC 0.9512"`` (the figures, upper-cased names)."""
        return " ".join(f"{name.upper()} {value:.4f}" for name, value in self.figures.items())
