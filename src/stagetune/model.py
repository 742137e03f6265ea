"""Acoustic model: 2D conv front-end -> recurrent stack -> linear head, and task heads.

Shapes: ``B`` utterances, ``T`` input frames, ``F`` feature bins, ``T'`` output
frames (after time strides), ``C`` outputs.  Padded batches carry their lengths;
padding never changes the valid outputs of another utterance (inputs and every
conv output are zeroed beyond each utterance's length, and the recurrent stack
runs on packed sequences).

The task (:mod:`stagetune.tasks`) builds the output head on top of the encoder
(conv front-end + recurrent stack) and turns its logits into a loss, hypotheses
and error counts.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from stagetune.config import Config, ModelConfig
from stagetune.plugins import encoder_builder
from stagetune.tasks import task_of
from stagetune.tasks.base import FrameHead
from stagetune.tasks.base import frame_mask as _frame_mask

__all__ = [
    "NONLINEARITIES",
    "RECURRENT_CELLS",
    "AcousticModel",
    "EncoderModel",
    "build_model",
    "build_encoder",
    "measure_output_lengths",
    "stride_of",
    "time_geometry",
    "output_lengths",
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


def _reversed_index(lengths: Tensor, num_frames: int) -> Tensor:
    """``(B, num_frames)``: frame ``t`` of each utterance maps to ``length - 1 - t``; padding stays put."""
    frames = torch.arange(num_frames, device=lengths.device).unsqueeze(0)
    lengths = lengths.unsqueeze(1)
    return torch.where(frames < lengths, lengths - 1 - frames, frames)


def _scheduled(config: ModelConfig, layer: int) -> bool:
    """Whether conv layer ``layer`` (0-based) strides (see :class:`AcousticModel`)."""
    return (layer + 1) % config.convolutional_factor_sched == 0


def time_geometry(config: ModelConfig) -> list[tuple[int, int]]:
    """``(kernel_time, stride_time)`` of each conv layer of the model ``config`` describes.

    None for a plugin's encoder (``model.encoder`` other than ``crnn``), whose
    geometry its own section sets: its model's ``output_lengths`` is exact.
    """
    if config.encoder != "crnn":
        return []
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
        head: Builds the output head from the units per encoder frame (default: a
            linear layer per frame, :class:`~stagetune.tasks.base.FrameHead`).
    """

    def __init__(
        self,
        config: ModelConfig,
        feat_dim: int,
        num_outputs: int,
        *,
        dropout_prob: float = 0.0,
        head: Callable[[int], nn.Module] | None = None,
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
        #: The backward stack of ``bidirectional_mode = stack`` (``rnn`` is then the forward one).
        self.rnn_backward: nn.RNNBase | None = None
        if config.recurrent_layers > 0:
            separate = config.recurrent_bidirectional and config.bidirectional_mode == "stack"

            def stack(bidirectional: bool) -> nn.RNNBase:
                return RECURRENT_CELLS[config.recurrent_type](
                    frame_dim,
                    config.recurrent_size,
                    num_layers=config.recurrent_layers,
                    batch_first=True,
                    bidirectional=bidirectional,
                    dropout=dropout_prob if config.recurrent_layers > 1 else 0.0,
                )

            self.rnn = stack(config.recurrent_bidirectional and not separate)
            if separate:
                self.rnn_backward = stack(False)
            frame_dim = config.recurrent_size * (2 if config.recurrent_bidirectional else 1)
            self.rnn_dropout = nn.Dropout(dropout_prob)
        #: Units per encoder frame (what the head reads).
        self.state_dim = frame_dim
        # ``output``: the name model files have always used for the last layer.
        self.output = head(frame_dim) if head is not None else FrameHead(frame_dim, num_outputs)

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
        """The head's logits: ``self.output(*self.encode(feats, feat_lens))``."""
        states, out_lens = self.encode(feats, feat_lens)
        return self.output(states, out_lens)

    def encode(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's states per output frame (what the head reads).

        Args:
            feats: ``(B, T, F)`` padded features.
            feat_lens: ``(B,)`` valid frames per utterance, each in ``[1, T]``.

        Returns:
            ``(states, out_lens)``: ``(B, T', H)`` states and ``(B,)`` long
            output lengths (on ``feat_lens``'s device).  States beyond an
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
            forward, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=num_frames)
            if self.rnn_backward is not None:
                # The backward stack reads each utterance reversed within its length.
                order = _reversed_index(out_lens.to(x.device), num_frames)
                flipped = x.gather(1, order.unsqueeze(-1).expand_as(x))
                packed = pack_padded_sequence(flipped, out_lens, batch_first=True, enforce_sorted=False)
                backward, _ = pad_packed_sequence(
                    self.rnn_backward(packed)[0], batch_first=True, total_length=num_frames
                )
                backward = backward.gather(1, order.unsqueeze(-1).expand_as(backward))
                forward = torch.cat([forward, backward], dim=-1)
            x = forward
            x = self.rnn_dropout(x)  # (B, T', H * directions)
        return x, out_lens.to(feat_lens.device)

    def num_parameters(self) -> int:
        """Number of parameters (all are trainable)."""
        return sum(p.numel() for p in self.parameters())


def build_encoder(config: Config, feat_dim: int) -> nn.Module:
    """The plugin encoder ``config.model.encoder`` names, built from its own section of ``config``."""
    name = config.model.encoder
    return encoder_builder(name)(getattr(config, name, None), feat_dim, config)


def measure_output_lengths(encoder: nn.Module, feat_dim: int, lengths: Sequence[int]) -> dict[int, int]:
    """Output frames of a plugin encoder for each input length, found by running it.

    For an encoder without ``output_lengths``: each length is one utterance of
    zeros through ``encode`` (in eval mode, without gradients) on the device of
    the encoder's parameters, the meta device included; its output frames are
    the returned ``out_lens`` or, where those are on the meta device too, the
    frames of the states.

    Args:
        encoder: A module with ``encode(feats, feat_lens)``.
        feat_dim: Feature bins per frame.
        lengths: Input frames to measure (each >= 1).

    Returns:
        Input frames -> output frames, for each distinct length.
    """
    weight = next(encoder.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    training = encoder.training
    encoder.eval()
    measured: dict[int, int] = {}
    try:
        with torch.no_grad():
            for length in sorted({int(n) for n in lengths}):
                feats = torch.zeros(1, length, feat_dim, device=device)
                states, out_lens = encoder.encode(feats, torch.tensor([length], device="cpu"))
                out = torch.as_tensor(out_lens).reshape(-1)
                measured[length] = int(states.size(1)) if out.device.type == "meta" else int(out[0])
    finally:
        encoder.train(training)
    return measured


def stride_of(measured: dict[int, int]) -> int:
    """The time stride that input -> output frames ``measured`` show (between the extreme lengths)."""
    low, high = min(measured), max(measured)
    frames = measured[high] - measured[low] if high > low else measured[high]
    span = high - low if high > low else high
    return max(1, round(span / frames)) if frames > 0 else max(1, span)


class EncoderModel(nn.Module):
    """A plugin's encoder (``model.encoder``, see :mod:`stagetune.plugins`) and the task's head.

    Offers what :class:`AcousticModel` offers its callers: ``encode``, the head
    as ``output``, ``time_stride``, ``output_lengths``, ``state_dim`` and
    ``num_parameters``.

    Args:
        encoder: A module with ``encode(feats, feat_lens) -> (states, out_lens)``
            and ``state_dim``; optionally ``time_stride`` and
            ``output_lengths(feat_lens)``.  Without them both are measured
            (:func:`measure_output_lengths`), which needs ``feat_dim``.
        head: Builds the output head from the units per encoder frame.
        feat_dim: Feature bins per frame.
    """

    #: Input lengths the time stride of an encoder without ``time_stride`` is measured at.
    STRIDE_PROBES = (480, 960)

    def __init__(self, encoder: nn.Module, head: Callable[[int], nn.Module], feat_dim: int | None = None) -> None:
        super().__init__()
        missing = [a for a in ("encode", "state_dim") if not hasattr(encoder, a)]
        if not (hasattr(encoder, "time_stride") and hasattr(encoder, "output_lengths")) and feat_dim is None:
            missing.append("time_stride and output_lengths (or a feat_dim to measure them)")
        if missing:
            raise ValueError(f"encoder {type(encoder).__name__} lacks {', '.join(missing)}")
        self.encoder = encoder
        self.feat_dim = feat_dim
        self.state_dim = int(encoder.state_dim)
        #: Total subsampling of the time axis.
        self.time_stride = (
            int(encoder.time_stride) if hasattr(encoder, "time_stride")
            else stride_of(measure_output_lengths(encoder, feat_dim, self.STRIDE_PROBES))  # type: ignore[arg-type]
        )
        self.output = head(self.state_dim)

    def output_lengths(self, feat_lens: Any) -> Any:
        """Output frames per utterance: the encoder's ``output_lengths``, else measured.

        Measured lengths come back as a tensor for a tensor, an array for an
        array and an int for an int.
        """
        if hasattr(self.encoder, "output_lengths"):
            return self.encoder.output_lengths(feat_lens)
        flat = torch.as_tensor(feat_lens).reshape(-1).tolist()
        measured = measure_output_lengths(self.encoder, self.feat_dim, flat)  # type: ignore[arg-type]
        out = [measured[int(n)] for n in flat]
        if isinstance(feat_lens, Tensor):
            return torch.tensor(out, dtype=torch.long, device=feat_lens.device).reshape(feat_lens.shape)
        if isinstance(feat_lens, np.ndarray):
            return np.array(out, dtype=np.int64).reshape(feat_lens.shape)
        return out[0]

    def encode(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """The encoder's ``(states (B, T', H), out_lens (B,))``."""
        return self.encoder.encode(feats, feat_lens)

    def forward(self, feats: Tensor, feat_lens: Tensor) -> tuple[Tensor, Tensor]:
        """The head's logits: ``self.output(*self.encode(feats, feat_lens))``."""
        return self.output(*self.encode(feats, feat_lens))

    def num_parameters(self) -> int:
        """Number of parameters."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: Config, feat_dim: int, num_outputs: int) -> AcousticModel | EncoderModel:
    """The model described by ``config.model`` with ``config.training.dropout_prob``.

    ``model.encoder = crnn`` is an :class:`AcousticModel`; a plugin's encoder,
    built from its own section of ``config``, is wrapped in an :class:`EncoderModel`.

    Args:
        config: The whole configuration.
        feat_dim: Feature bins per frame.
        num_outputs: Output units (``task_of(config).num_outputs(...)``).
    """
    task = task_of(config)

    def head(state_dim: int) -> nn.Module:
        return task.build_head(state_dim, num_outputs, config)

    if config.model.encoder == "crnn":
        return AcousticModel(
            config.model, feat_dim, num_outputs, dropout_prob=config.training.dropout_prob, head=head
        )
    return EncoderModel(build_encoder(config, feat_dim), head, feat_dim)


