"""Acoustic model: 2D conv front-end -> recurrent stack -> linear head, and task heads.

Shapes: ``B`` utterances, ``T`` input frames, ``F`` feature bins, ``T'`` output
frames (after time strides), ``C`` outputs.  Padded batches carry their lengths;
padding never changes the valid outputs of another utterance (inputs and every
conv output are zeroed beyond each utterance's length, and the recurrent stack
runs on packed sequences).

A task (:data:`TASKS`) turns the model's logits into a loss, hypotheses and
error counts: ``"ctc"`` for token sequences, ``"frame"`` for one class per
frame.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stagetune.config import Config, ModelConfig
from stagetune.metrics import ErrorCounts, ctc_collapse, edit_distance

__all__ = [
    "NONLINEARITIES",
    "RECURRENT_CELLS",
    "AcousticModel",
    "build_model",
    "time_geometry",
    "output_lengths",
    "subsample_labels",
    "Task",
    "CTCTask",
    "FrameTask",
    "TASKS",
]

#: ``model.convolutional_nonlinearity`` -> module factory.
NONLINEARITIES: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

#: ``model.recurrent_type`` -> recurrent module class.
RECURRENT_CELLS: dict[str, type[nn.RNNBase]] = {
    "lstm": nn.LSTM,
    "gru": nn.GRU,
    "rnn": nn.RNN,
}


def _conv_length(length: Tensor, kernel: int, stride: int) -> Tensor:
    """Output size of a conv with padding ``kernel // 2`` (works on ints too)."""
    return (length + 2 * (kernel // 2) - kernel) // stride + 1


def _frame_mask(lengths: Tensor, num_frames: int) -> Tensor:
    """``(B, num_frames)`` bool mask, true on frames ``< lengths``."""
    return torch.arange(num_frames, device=lengths.device) < lengths.unsqueeze(1)


def _scheduled(config: ModelConfig, layer: int) -> bool:
    """Whether conv layer ``layer`` (0-based) strides (see :class:`AcousticModel`)."""
    return (layer + 1) % config.convolutional_factor_sched == 0


def time_geometry(config: ModelConfig) -> list[tuple[int, int]]:
    """``(kernel_time, stride_time)`` of each conv layer of the model ``config`` describes."""
    return [
        (config.convolutional_kernel_time, config.convolutional_time_factor if _scheduled(config, i) else 1)
        for i in range(config.convolutional_layers)
    ]


def _output_lengths(geometry: Sequence[tuple[int, int]], lengths: Any) -> Any:
    for kernel, stride in geometry:
        lengths = _conv_length(lengths, kernel, stride)
    return lengths


def output_lengths(config: ModelConfig, feat_lens: Any) -> Any:
    """:meth:`AcousticModel.output_lengths` without building the model.

    Args:
        config: The ``[model]`` section.
        feat_lens: Input frames: an ``int``, a numpy array or a tensor.

    Returns:
        Output frames, of the same type.
    """
    return _output_lengths(time_geometry(config), feat_lens)


class AcousticModel(nn.Module):
    """Conv2d front-end over (time x frequency), recurrent stack, per-frame linear output.

    Convolutional layer ``i`` (0-based) is *scheduled* when
    ``(i + 1) % convolutional_factor_sched == 0``: it strides by
    ``(convolutional_time_factor, convolutional_freq_factor)``; other layers
    stride 1.  Channels grow after each scheduled layer:
    ``channels_i = convolutional_initial_channels * convolutional_channel_factor
    ** (i // convolutional_factor_sched)`` (the exponent is the number of
    scheduled layers before ``i``), so the first layer always has
    ``convolutional_initial_channels``.  Every conv pads ``k // 2`` on both
    axes and is followed by the nonlinearity and channel (2D) dropout.

    Padding ``k // 2`` keeps every axis at least 1 long for any input of at
    least 1 (``(n + 2 * (k // 2) - k) >= 0``), so any number of frequency
    strides is safe: the frequency axis bottoms out at 1 bin instead of
    collapsing.  Even kernels grow an axis by one per stride-1 layer; lengths
    are exact in every case (:meth:`output_lengths`).

    The conv output is flattened per frame (channels x remaining frequency
    bins) and read by ``recurrent_layers`` stacked (bi)directional cells with
    dropout between layers, then dropout and a linear layer to the outputs.
    With no conv layers the features go straight to the recurrent stack; with
    no recurrent layers the linear layer reads the conv output (or features).

    Args:
        config: The ``[model]`` section.
        feat_dim: Feature bins per frame (``F``).
        num_outputs: Output units per frame (``C``); see :meth:`Task.num_outputs`.
        dropout_prob: Dropout after every conv layer, between recurrent layers
            and before the output layer (``training.dropout_prob``).
    """

    def __init__(
        self,
        config: ModelConfig,
        feat_dim: int,
        num_outputs: int,
        *,
        dropout_prob: float = 0.0,
    ) -> None:
        super().__init__()
        if feat_dim < 1:
            raise ValueError(f"feat_dim must be >= 1, got {feat_dim}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if config.convolutional_nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"unknown convolutional_nonlinearity {config.convolutional_nonlinearity!r}; "
                f"allowed: {', '.join(sorted(NONLINEARITIES))}"
            )
        if config.recurrent_type not in RECURRENT_CELLS:
            raise ValueError(
                f"unknown recurrent_type {config.recurrent_type!r}; "
                f"allowed: {', '.join(sorted(RECURRENT_CELLS))}"
            )
        self.feat_dim = feat_dim
        self.num_outputs = num_outputs

        #: ``(kernel_time, stride_time)`` of each conv layer, for :meth:`output_lengths`.
        self._time_geometry = time_geometry(config)
        self.convs = nn.ModuleList()
        self.conv_activations = nn.ModuleList()
        self.conv_dropouts = nn.ModuleList()
        in_channels, freq = 1, feat_dim
        kernel = (config.convolutional_kernel_time, config.convolutional_kernel_freq)
        sched = config.convolutional_factor_sched
        for i in range(config.convolutional_layers):
            stride = (
                (config.convolutional_time_factor, config.convolutional_freq_factor)
                if _scheduled(config, i)
                else (1, 1)
            )
            channels = config.convolutional_initial_channels * (
                config.convolutional_channel_factor ** (i // sched)
            )
            padding = (kernel[0] // 2, kernel[1] // 2)
            self.convs.append(nn.Conv2d(in_channels, channels, kernel, stride, padding))
            self.conv_activations.append(NONLINEARITIES[config.convolutional_nonlinearity]())
            self.conv_dropouts.append(nn.Dropout2d(dropout_prob))
            in_channels, freq = channels, _conv_length(freq, kernel[1], stride[1])
        #: Total subsampling of the time axis (product of the time strides).
        self.time_stride = 1
        for _, stride_time in self._time_geometry:
            self.time_stride *= stride_time
        frame_dim = in_channels * freq if self.convs else feat_dim
        self.frame_norm = nn.LayerNorm(frame_dim) if config.frame_norm == "layer" else None

        self.rnn: nn.RNNBase | None = None
        if config.recurrent_layers > 0:
            self.rnn = RECURRENT_CELLS[config.recurrent_type](
                frame_dim,
                config.recurrent_size,
                num_layers=config.recurrent_layers,
                batch_first=True,
                bidirectional=config.recurrent_bidirectional,
                dropout=dropout_prob if config.recurrent_layers > 1 else 0.0,
            )
            frame_dim = config.recurrent_size * (2 if config.recurrent_bidirectional else 1)
            self.rnn_dropout = nn.Dropout(dropout_prob)
        self.output = nn.Linear(frame_dim, num_outputs)

    def output_lengths(self, feat_lens: Tensor) -> Tensor:
        """Exact output frames per utterance.

        Per conv layer ``L = floor((L + 2 * (k // 2) - k) / s) + 1`` with the
        layer's time kernel ``k`` and stride ``s``.

        Args:
            feat_lens: ``(B,)`` input frames (an ``int`` also works).

        Returns:
            ``(B,)`` output frames, same type and device as ``feat_lens``.
        """
        return _output_lengths(self._time_geometry, feat_lens)

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """Per-frame logits.

        Args:
            feats: ``(B, T, F)`` padded features.
            feat_lens: ``(B,)`` valid frames per utterance, each in ``[1, T]``.

        Returns:
            ``(logits, out_lens)``: ``(B, T', C)`` logits and ``(B,)`` long
            output lengths (on ``feat_lens``'s device).  Logits beyond an
            utterance's ``out_lens`` are meaningless and must be masked.
        """
        if feats.dim() != 3 or feats.size(-1) != self.feat_dim:
            raise ValueError(
                f"feats must have shape (B, T, {self.feat_dim}), got {tuple(feats.shape)}"
            )
        if feat_lens.shape != feats.shape[:1]:
            raise ValueError(
                f"feat_lens must have shape ({feats.size(0)},), got {tuple(feat_lens.shape)}"
            )
        cpu_lens = feat_lens.detach().to("cpu", torch.long)
        if len(cpu_lens) and (cpu_lens.min() < 1 or cpu_lens.max() > feats.size(1)):
            raise ValueError(
                f"feat_lens must lie in [1, {feats.size(1)}] (the padded length), "
                f"got {cpu_lens.tolist()}"
            )
        lens = cpu_lens.to(feats.device)
        x = feats.masked_fill(~_frame_mask(lens, feats.size(1)).unsqueeze(-1), 0.0)
        if self.convs:
            x = x.unsqueeze(1)  # (B, 1, T, F)
            for conv, activation, dropout, (kernel, stride) in zip(
                self.convs, self.conv_activations, self.conv_dropouts, self._time_geometry
            ):
                x = dropout(activation(conv(x)))  # (B, C_i, T_i, F_i)
                lens = _conv_length(lens, kernel, stride)
                # Zero frames past each length so the next conv sees the same
                # zeros at the right edge as an unpadded utterance would.
                x = x.masked_fill(~_frame_mask(lens, x.size(2))[:, None, :, None], 0.0)
            x = x.transpose(1, 2).flatten(2)  # (B, T', C * F')
        out_lens = self.output_lengths(cpu_lens)
        if self.frame_norm is not None:
            x = self.frame_norm(x)
        if self.rnn is not None:
            num_frames = x.size(1)
            # Packing keeps padding out of the backward direction.
            packed = pack_padded_sequence(x, out_lens, batch_first=True, enforce_sorted=False)
            x, _ = pad_packed_sequence(
                self.rnn(packed)[0], batch_first=True, total_length=num_frames
            )
            x = self.rnn_dropout(x)  # (B, T', H * directions)
        return self.output(x), out_lens.to(feat_lens.device)

    def num_parameters(self) -> int:
        """Number of parameters (all are trainable)."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: Config, feat_dim: int, num_outputs: int) -> AcousticModel:
    """The model described by ``config.model`` with ``config.training.dropout_prob``.

    Args:
        config: The whole configuration.
        feat_dim: Feature bins per frame.
        num_outputs: Output units per frame (``TASKS[config.model.task].num_outputs(...)``).
    """
    return AcousticModel(
        config.model, feat_dim, num_outputs, dropout_prob=config.training.dropout_prob
    )


def subsample_labels(
    labels: Tensor,
    lens: Tensor,
    factor: int,
    *,
    out_lens: Tensor | None = None,
    num_frames: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Frame labels at the output frame rate of a model with time stride ``factor``.

    Output frame ``j`` covers input frames ``[j * factor, (j + 1) * factor)``
    (its stride window) and takes the label at the window's centre, input frame
    ``j * factor + factor // 2``, clamped to the utterance's last frame (the
    last window may be cut short, and even kernels add a trailing frame).

    Args:
        labels: ``(B, T)`` long labels per input frame, padded (any value).
        lens: ``(B,)`` labelled input frames per utterance.
        factor: The model's :attr:`AcousticModel.time_stride`.
        out_lens: ``(B,)`` output frames per utterance; defaults to
            ``ceil(lens / factor)``.  Pass the model's ``out_lens`` so the
            labels line up with its logits.
        num_frames: Width of the result (``T'``); defaults to ``max(out_lens)``.

    Returns:
        ``(sub_labels, out_lens)``: ``(B, T')`` long labels, ``-1`` beyond each
        utterance's ``out_lens``, and the ``(B,)`` lengths used.
    """
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    lens = lens.to(labels.device, torch.long)
    if out_lens is None:
        out_lens = (lens + factor - 1) // factor
    out_lens = out_lens.to(labels.device, torch.long)
    if num_frames is None:
        num_frames = int(out_lens.max()) if out_lens.numel() else 0
    frames = torch.arange(num_frames, device=labels.device)
    positions = frames * factor + factor // 2  # (T',)
    positions = torch.minimum(positions.unsqueeze(0), (lens - 1).clamp(min=0).unsqueeze(1))
    valid = (frames.unsqueeze(0) < out_lens.unsqueeze(1)) & (lens > 0).unsqueeze(1)
    if labels.size(1) == 0:
        return labels.new_full(valid.shape, -1), out_lens
    sub = labels.long().gather(1, positions.clamp(max=labels.size(1) - 1))
    return sub.masked_fill(~valid, -1), out_lens


class Task(abc.ABC):
    """An output head: output size, loss, decoding and error counting.

    Targets arrive padded with ``-1``.  :meth:`loss` and :meth:`references`
    take the model's :attr:`AcousticModel.time_stride` as ``time_stride``;
    heads that do not need it (CTC) ignore it, heads that do (frame) raise
    :class:`ValueError` without it rather than silently misalign labels.
    """

    #: Registry key (``model.task``).
    name: str = ""
    #: Short name of the error rate, e.g. ``"TER"``, for :meth:`ErrorCounts.describe`.
    error_name: str = "ER"

    @abc.abstractmethod
    def num_outputs(self, num_symbols: int) -> int:
        """Output units for a symbol inventory of ``num_symbols`` entries."""

    @abc.abstractmethod
    def loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> Tensor:
        """Scalar mean loss (float32).

        Args:
            logits: ``(B, T', C)`` model output.
            out_lens: ``(B,)`` valid output frames.
            targets: ``(B, U)`` targets padded with ``-1``.
            target_lens: ``(B,)`` valid targets per utterance.
            time_stride: The model's :attr:`AcousticModel.time_stride`.
        """

    @abc.abstractmethod
    def summed_loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> tuple[Tensor, int]:
        """``(loss summed over the batch, number of units it is summed over)``.

        Summed over batches and divided by the summed units, this is the loss
        per unit (CTC: per target token; frame: per labelled output frame)
        whatever the batching and padding; the dev loss of validation.
        Arguments as for :meth:`loss`.
        """

    def frames_needed(self, targets: Sequence[Sequence[int]]) -> np.ndarray:
        """Fewest output frames each utterance needs for its targets (0: any number will do).

        Args:
            targets: Per utterance, its targets as :meth:`DataDir.targets` gives them.

        Returns:
            int64 ``(len(targets),)``.
        """
        return np.zeros(len(targets), dtype=np.int64)

    @abc.abstractmethod
    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[int]]:
        """Best hypothesis per utterance from ``(B, T', C)`` logits."""

    @abc.abstractmethod
    def references(
        self,
        targets: Tensor,
        target_lens: Tensor,
        out_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> list[list[int]]:
        """Per-utterance references in the form :meth:`decode` hypotheses take."""

    @abc.abstractmethod
    def errors(self, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> ErrorCounts:
        """Error counts summed over utterances."""


def _unpad(targets: Tensor, target_lens: Tensor) -> list[list[int]]:
    """Rows of a ``(B, U)`` padded tensor, or pieces of a concatenated ``(sum U,)`` one."""
    lens = target_lens.tolist()
    if targets.dim() == 1:
        pieces = torch.split(targets.detach().cpu(), lens)
        return [piece.tolist() for piece in pieces]
    rows = targets.detach().cpu().tolist()
    return [row[:length] for row, length in zip(rows, lens)]


def _check_pairs(refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> None:
    if len(refs) != len(hyps):
        raise ValueError(f"got {len(refs)} references but {len(hyps)} hypotheses")


class CTCTask(Task):
    """Token sequences with CTC; blank is id 0 of the token table."""

    name = "ctc"
    error_name = "TER"
    blank = 0

    def num_outputs(self, num_symbols: int) -> int:
        """The token table size, which already includes ``<blank>`` at id 0."""
        if num_symbols < 2:
            raise ValueError(
                f"a CTC token table needs <blank> and at least one token, got {num_symbols} entries"
            )
        return num_symbols

    def loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> Tensor:
        """CTC loss, ``reduction='mean'`` (per-utterance loss / target length, batch mean).

        ``targets`` may be ``(B, U)`` padded or ``(sum U,)`` concatenated.
        Infeasible utterances (more targets than frames allow) contribute zero
        loss and gradient instead of infinity; training refuses such data
        beforehand (:mod:`stagetune.feasibility`).
        """
        return self._ctc_loss(logits, out_lens, targets, target_lens, "mean")

    def summed_loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> tuple[Tensor, int]:
        """Summed CTC loss and the number of target tokens (loss per token = ratio of sums)."""
        loss = self._ctc_loss(logits, out_lens, targets, target_lens, "sum")
        return loss, int(target_lens.sum())

    def _ctc_loss(
        self, logits: Tensor, out_lens: Tensor, targets: Tensor, target_lens: Tensor, reduction: str
    ) -> Tensor:
        log_probs = logits.float().log_softmax(-1).transpose(0, 1)  # (T', B, C)
        target_lens = target_lens.to(torch.long)
        if targets.dim() == 2:
            mask = _frame_mask(target_lens.to(targets.device), targets.size(1))
            targets = targets[mask]
        return F.ctc_loss(
            log_probs,
            targets.to(logits.device, torch.long),
            out_lens.to(torch.long),
            target_lens,
            blank=self.blank,
            reduction=reduction,
            zero_infinity=True,
        )

    def frames_needed(self, targets: Sequence[Sequence[int]]) -> np.ndarray:
        """Tokens plus adjacent repeats: CTC must put a blank between two equal tokens."""
        lens = np.fromiter((len(t) for t in targets), dtype=np.int64, count=len(targets))
        if not lens.sum():
            return lens
        flat = np.concatenate([np.asarray(t, dtype=np.int64) for t in targets])
        starts = np.cumsum(lens) - lens
        repeat = np.zeros(len(flat), dtype=bool)  # token i equals token i - 1 of its utterance
        repeat[1:] = flat[1:] == flat[:-1]
        repeat[starts[lens > 0]] = False
        counted = np.concatenate([[0], np.cumsum(repeat)])
        return lens + counted[starts + lens] - counted[starts]

    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[int]]:
        """Greedy (best-path) decoding: argmax, merge repeats, drop blanks."""
        best = logits.argmax(-1).cpu().tolist()
        lengths = out_lens.tolist()
        return [ctc_collapse(path[:length], self.blank) for path, length in zip(best, lengths)]

    def references(
        self,
        targets: Tensor,
        target_lens: Tensor,
        out_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> list[list[int]]:
        """The unpadded token sequences."""
        return _unpad(targets, target_lens)

    def errors(self, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> ErrorCounts:
        """Summed edit distances (token error rate)."""
        _check_pairs(refs, hyps)
        total = ErrorCounts()
        for ref, hyp in zip(refs, hyps):
            total += edit_distance(ref, hyp)
        return total


class FrameTask(Task):
    """One class per input frame, subsampled to the output frame rate; cross-entropy."""

    name = "frame"
    error_name = "FER"

    def num_outputs(self, num_symbols: int) -> int:
        """The number of classes."""
        if num_symbols < 1:
            raise ValueError(f"the frame task needs at least one class, got {num_symbols}")
        return num_symbols

    @staticmethod
    def _stride(time_stride: int | None) -> int:
        if time_stride is None:
            raise ValueError(
                "the frame task subsamples per-frame labels to the model's output frames; "
                "pass time_stride=model.time_stride"
            )
        return time_stride

    def loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> Tensor:
        """Cross-entropy averaged over valid output frames.

        ``targets`` are ``(B, T)`` labels per *input* frame and ``target_lens``
        the labelled input frames; they are subsampled with
        :func:`subsample_labels` to the model's output frames.  Frames whose
        label is ``-1`` are ignored.
        """
        losses, frames = self._summed(logits, out_lens, targets, target_lens, time_stride)
        # A batch without labelled frames gives 0 rather than 0/0.
        return losses / frames.clamp(min=1)

    def summed_loss(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> tuple[Tensor, int]:
        """Summed cross-entropy and the number of labelled output frames."""
        losses, frames = self._summed(logits, out_lens, targets, target_lens, time_stride)
        return losses, int(frames)

    def _summed(
        self,
        logits: Tensor,
        out_lens: Tensor,
        targets: Tensor,
        target_lens: Tensor,
        time_stride: int | None,
    ) -> tuple[Tensor, Tensor]:
        labels, _ = subsample_labels(
            targets.to(logits.device),
            target_lens,
            self._stride(time_stride),
            out_lens=out_lens,
            num_frames=logits.size(1),
        )
        flat_labels = labels.reshape(-1)
        losses = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            flat_labels,
            ignore_index=-1,
            reduction="sum",
        )
        return losses, (flat_labels >= 0).sum()

    def decode(self, logits: Tensor, out_lens: Tensor) -> list[list[int]]:
        """The most likely class of every valid output frame."""
        best = logits.argmax(-1).cpu().tolist()
        return [path[:length] for path, length in zip(best, out_lens.tolist())]

    def references(
        self,
        targets: Tensor,
        target_lens: Tensor,
        out_lens: Tensor,
        *,
        time_stride: int | None = None,
    ) -> list[list[int]]:
        """Labels at the output frame rate (:func:`subsample_labels`), one per output frame."""
        sub, lens = subsample_labels(
            targets, target_lens, self._stride(time_stride), out_lens=out_lens
        )
        return _unpad(sub, lens)

    def errors(self, refs: Sequence[Sequence[int]], hyps: Sequence[Sequence[int]]) -> ErrorCounts:
        """Per-frame mismatches, counted as substitutions (frame error rate).

        Args:
            refs: One label per *output* frame (:meth:`references`).
            hyps: One label per output frame (:meth:`decode`).

        Raises:
            ValueError: If a reference and its hypothesis differ in length
                (typically references at the input frame rate).
        """
        _check_pairs(refs, hyps)
        total = ErrorCounts()
        for index, (ref, hyp) in enumerate(zip(refs, hyps)):
            if len(ref) != len(hyp):
                raise ValueError(
                    f"utterance {index}: {len(ref)} reference labels but {len(hyp)} output "
                    f"frames; frame references must be subsampled to the output frames "
                    f"(Task.references)"
                )
            total += ErrorCounts(
                substitutions=sum(r != h for r, h in zip(ref, hyp)),
                ref_length=len(ref),
                utterances=1,
            )
        return total


#: ``model.task`` -> head.
TASKS: dict[str, Task] = {task.name: task for task in (CTCTask(), FrameTask())}
