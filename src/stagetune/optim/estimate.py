"""The synthetic training step, its cache key, and its meta-device estimate.

:class:`SyntheticStep` is the one step every memory figure (and the step
time of :mod:`stagetune.optim.duration`) is of: the model and optimizer
built on a device and a training step run on the trial's largest batch
(:func:`run_synthetic_step` builds it and runs it once).
:func:`footprint_key` names what changes its memory, and :class:`Footprint`
is the figure all methods return.

:func:`estimate_step` runs that step on the meta device under the tracker
(no data, no memory), so a trial far over budget, or one that would not fit
in RAM, is known before anything real is allocated.  Recurrent layers are
replaced by a stand-in that keeps, for backward, what the real kernel keeps
(:data:`RECURRENT_COSTS`): on meta PyTorch decomposes LSTM/GRU into
per-time-step operators (tens of seconds for long utterances) and, on CPU,
the real LSTM is oneDNN's, whose workspace is not what the decomposition
keeps.

The step, key and figure live here rather than in :mod:`stagetune.optim.memory`
so that the data flows one way: tracker, then this module, then the
measurement and the check in ``memory``, which re-exports all of them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from stagetune.adaptation import Adaptation
from stagetune.config import Config, active, flatten, iter_fields
from stagetune.model import build_model
from stagetune.step import train_step
from stagetune.tasks import task_of
from stagetune.optim.tracker import AllocationTracker
from stagetune.training import make_optimizer

__all__ = [
    "Footprint",
    "RecurrentCost",
    "RECURRENT_COSTS",
    "footprint_key",
    "SyntheticStep",
    "run_synthetic_step",
    "estimate_step",
]

#: Bump when what a footprint measures changes, so cached figures are not reused.
_KEY_VERSION = 1


@dataclass(frozen=True)
class Footprint:
    """Peak memory of one training step.

    Attributes:
        bytes: Peak bytes of the step (see :mod:`stagetune.optim.memory` for
            what each method includes).
        method: ``"cuda"``, ``"cpu-tracker"``, ``"meta-estimate"``, ``"cached"``
            (from the study's cache), or ``"<method>-oom"`` when measuring ran
            out of memory (``bytes`` is then above the limit and the device).
        seconds: Wall time spent getting the figure.
        key: The architecture key (:func:`footprint_key`).
    """

    bytes: int
    method: str
    seconds: float
    key: str

    def fits(self, limit_bytes: int | None) -> bool:
        """Whether the step fits in ``limit_bytes`` (``None``: no limit)."""
        return limit_bytes is None or self.bytes <= limit_bytes


def _check_sizes(
    feat_dim: int, num_outputs: int, batch_size: int, max_frames: int, max_target_len: int
) -> None:
    for name, value, low in (
        ("feat_dim", feat_dim, 1),
        ("num_outputs", num_outputs, 1),
        ("batch_size", batch_size, 1),
        ("max_frames", max_frames, 1),
        ("max_target_len", max_target_len, 0),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def footprint_key(
    config: Config,
    feat_dim: int,
    num_outputs: int,
    batch_size: int,
    max_frames: int,
    max_target_len: int,
    *,
    device: torch.device | str = "cuda",
    base: Config | None = None,
) -> str:
    """A stable key for everything that changes a step's memory.

    Hashes the active ``[model]`` fields and those of a plugin's section (inactive ones, e.g. conv kernel
    sizes without conv layers, change nothing), the optimizer and whether it
    keeps momentum or decays weights (state and temporaries), whether dropout
    is on, the batch geometry, the device type and the compute dtype
    (default dtype, autocast on CUDA).  Learning rates, seeds and the like are
    left out, so trials differing only in those share one measurement.
    With a ``base`` model (the config of the model adapted, ``optim init
    --adapt-from``) its architecture and whether its forward runs
    (``training.adapt_rho > 0``) count too; without one the key is as before.
    """
    device = torch.device(device)
    t = config.training
    values = flatten(config)
    payload = {
        "version": _KEY_VERSION,
        "model": _architecture(config),
        "optimizer": t.optimizer,
        "momentum": t.optimizer == "sgd" and t.momentum > 0,
        "weight_decay": t.weight_decay > 0,
        "dropout": t.dropout_prob > 0,
        "sizes": [feat_dim, num_outputs, batch_size, max_frames, max_target_len],
        "device": device.type,
        "dtype": str(torch.get_default_dtype()),
        "autocast": device.type == "cuda" and t.autocast,
    }
    plugin = _plugin_fields(config)
    if plugin:  # a plugin encoder's own section (stagetune.plugins): only then, so built-in keys stay
        payload["plugin"] = plugin
    if base is not None:  # only then, so the keys of studies without a base stay
        payload["base"] = {"model": _architecture(base), "plugin": _plugin_fields(base), "forward": t.adapt_rho > 0}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"step-v{_KEY_VERSION}-{digest[:24]}"


def _architecture(config: Config) -> dict[str, Any]:
    """The active ``[model]`` fields of ``config``."""
    values = flatten(config)
    return {info.key: values[info.name] for info in iter_fields() if info.section == "model" and active(info, values)}


def _plugin_fields(config: Config) -> dict[str, Any]:
    """The active fields of a plugin's own section (:mod:`stagetune.plugins`)."""
    values = flatten(config)
    return {
        info.name: values[info.name]
        for info in iter_fields()
        if info.section not in ("model", "training", "data") and active(info, values)
    }


class SyntheticStep:
    """A trial's model, optimizer and largest batch on a device; each call is one training step.

    The batch: feats ``(batch_size, max_frames, feat_dim)`` with every length
    ``max_frames``; CTC targets ``(batch_size, max_target_len)`` in
    ``1..num_outputs-1``, frame targets ``(batch_size, max_frames)`` labels.
    The optimizer state is allocated when the step is built (one step with
    zero gradients), so every call is a steady-state step.  On the meta
    device the feature lengths stay on the CPU (the model reads them as
    numbers).

    With a ``base`` (the config of a base model the trial adapts, ``optim init
    --adapt-from``) the base is built beside the model, frozen and in eval mode
    as :func:`stagetune.adaptation.load_base` leaves it, and each step regularises
    towards its outputs as training does (:class:`stagetune.adaptation.Adaptation`:
    its forward runs under ``no_grad`` when ``training.adapt_rho > 0``).  Its
    weights are random: memory and time depend on its shapes only.

    Args:
        prepare: Called with the model (and the base) before the optimizer is
            made (the estimate swaps recurrent layers here).
        base: The base model's config; None: no adaptation.
    """

    def __init__(
        self,
        config: Config,
        feat_dim: int,
        num_outputs: int,
        *,
        batch_size: int,
        max_frames: int,
        max_target_len: int,
        device: torch.device | str,
        prepare: Callable[[nn.Module], None] | None = None,
        base: Config | None = None,
    ) -> None:
        device = torch.device(device)
        _check_sizes(feat_dim, num_outputs, batch_size, max_frames, max_target_len)
        self.config, self.device = config, device
        lengths_device = torch.device("cpu") if device.type == "meta" else device
        with torch.device(device):
            self.model = build_model(config, feat_dim, num_outputs)
        if prepare is not None:
            prepare(self.model)
        self.adaptation: Adaptation | None = None
        if base is not None:
            with torch.device(device):
                base_model = build_model(base, feat_dim, num_outputs)
            if prepare is not None:
                prepare(base_model)
            base_model.eval().requires_grad_(False)
            self.adaptation = Adaptation(base_model, config.training.adapt_rho)
        self.optimizer = make_optimizer(self.model, config)
        # A step with zero gradients allocates the optimizer state up front.
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        self.feats = torch.randn(batch_size, max_frames, feat_dim, device=device)
        self.feat_lens = torch.full((batch_size,), max_frames, dtype=torch.long, device=lengths_device)
        self.task = task_of(config)
        self.targets, self.target_lens = self.task.synthetic_targets(
            batch_size, max_frames, max_target_len, num_outputs, device
        )
        use_amp = device.type == "cuda" and config.training.autocast
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None

    def __call__(self) -> None:
        """One training step, as :func:`stagetune.epoch.train_one_epoch` runs it per batch."""
        train_step(
            self.model, self.optimizer, self.task, self.feats, self.feat_lens, self.targets, self.target_lens,
            self.config.training, scaler=self.scaler, augment=self.device.type != "meta",
            adaptation=self.adaptation,
        )

    def timed(self, repeats: int = 1) -> float:
        """Wall seconds of the fastest of ``repeats`` steps (on CUDA, idle device to finished step).

        The fastest, because what slows a step down on a shared machine is
        another process, and training pays that only while it lasts.
        """
        fastest = float("inf")
        for _ in range(repeats):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            self()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            fastest = min(fastest, time.perf_counter() - start)
        return fastest


def run_synthetic_step(
    config: Config,
    feat_dim: int,
    num_outputs: int,
    *,
    batch_size: int,
    max_frames: int,
    max_target_len: int,
    device: torch.device | str,
    prepare: Callable[[nn.Module], None] | None = None,
    base: Config | None = None,
) -> None:
    """Build the model and optimizer on ``device`` and run one step on the largest batch.

    A :class:`SyntheticStep` built and called once; everything is freed on return.
    """
    SyntheticStep(
        config,
        feat_dim,
        num_outputs,
        batch_size=batch_size,
        max_frames=max_frames,
        max_target_len=max_target_len,
        device=device,
        prepare=prepare,
        base=base,
    )()


@dataclass(frozen=True)
class RecurrentCost:
    """Floats per valid frame, per layer and direction, a recurrent kernel keeps.

    Saved for backward: ``saved_h * H + saved_max * max(I, H)`` (``I`` the
    layer's input size), plus between layers the layer output (``D * H``),
    ``D * H`` more when each direction writes its own output before they are
    concatenated (``split_directions``), and ``dropout_floats * D * H`` when
    dropout acts between layers.  During backward (one layer and direction at
    a time) the kernel holds ``transient_h * H + transient_i * I`` more per
    frame, ``I`` the first layer's input size.
    """

    saved_h: float
    saved_max: float = 0.0
    split_directions: bool = False
    dropout_floats: float = 2.0
    transient_h: float = 0.0
    transient_i: float = 0.0


#: ``(backend, cell)`` -> cost.  CPU (torch 2.13) figures are fitted with the
#: tracker: LSTM is oneDNN's ``mkldnn_rnn_layer`` whose workspace grows with
#: ``max(I, H)``; GRU and RNN run PyTorch's per-step cells (GRU keeps 3 input
#: and 3 hidden gate pre-activations and the new state, 7H; RNN the
#: pre-activation, 1H).  CUDA figures follow cuDNN's reserve space layout
#: (per step: the gates plus cell and hidden states: LSTM 4+2, GRU 3+3+1,
#: RNN 1+1) and are not yet checked against a GPU (``bench/memory_accuracy.py``
#: prints the comparison when one is there).
RECURRENT_COSTS: dict[tuple[str, str], RecurrentCost] = {
    ("cpu", "LSTM"): RecurrentCost(
        9.3, 6.1, split_directions=True, transient_h=5.0, transient_i=1.0
    ),
    ("cpu", "GRU"): RecurrentCost(7.0, transient_h=4.0),
    ("cpu", "RNN"): RecurrentCost(1.0, transient_h=3.0),
    ("cuda", "LSTM"): RecurrentCost(6.0, dropout_floats=1.0, transient_h=2.0, transient_i=1.0),
    ("cuda", "GRU"): RecurrentCost(7.0, dropout_floats=1.0, transient_h=2.0, transient_i=1.0),
    ("cuda", "RNN"): RecurrentCost(2.0, dropout_floats=1.0, transient_h=2.0, transient_i=1.0),
}


class _StandInKernel(torch.autograd.Function):
    """Allocates what a recurrent kernel keeps and produces, computes nothing."""

    @staticmethod
    def forward(
        ctx: Any, data: Tensor, out_features: int, saved: int, transient: int, *weights: Tensor
    ) -> Tensor:
        ctx.workspace = data.new_empty(saved)  # kept for backward, as the real kernel's
        ctx.transient = transient
        ctx.save_for_backward(data, *weights)
        return data.new_empty(data.size(0), out_features)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        data, *weights = ctx.saved_tensors
        scratch = grad_output.new_empty(ctx.transient)
        grads = (torch.empty_like(data), None, None, None, *(torch.empty_like(w) for w in weights))
        del scratch, ctx.workspace
        return grads


class _RecurrentStandIn(nn.Module):
    """Replaces an ``nn.RNNBase`` on meta; keeps its parameters (grads, optimizer state)."""

    def __init__(self, rnn: nn.RNNBase, backend: str) -> None:
        super().__init__()
        self.rnn = rnn
        self.cost = RECURRENT_COSTS[(backend, rnn.mode.split("_")[0])]

    def _floats_per_frame(self) -> tuple[int, int]:
        rnn, cost = self.rnn, self.cost
        d, h = 2 if rnn.bidirectional else 1, rnn.hidden_size
        saved = 0.0
        for layer in range(rnn.num_layers):
            i = rnn.input_size if layer == 0 else d * h
            saved += d * (cost.saved_h * h + cost.saved_max * max(i, h))
            if cost.split_directions and d > 1:
                saved += d * h
            if layer < rnn.num_layers - 1:
                saved += d * h
                if rnn.dropout > 0 and self.training:
                    saved += cost.dropout_floats * d * h
        # Backward runs one layer and direction at a time.
        transient = cost.transient_h * h + cost.transient_i * rnn.input_size
        return int(saved + 0.5), int(transient + 0.5)

    def forward(self, input: Tensor | PackedSequence, hx: Any = None) -> tuple[Any, None]:
        rnn = self.rnn
        data = input.data if isinstance(input, PackedSequence) else input
        frames = data.reshape(-1, data.size(-1))
        saved, transient = self._floats_per_frame()
        if not torch.is_grad_enabled():  # a base model's forward (adaptation): nothing kept for backward
            saved = 0
        out_features = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        count = frames.size(0)
        out = _StandInKernel.apply(
            frames, out_features, saved * count, transient * count, *rnn._flat_weights
        )
        out = out.reshape(*data.shape[:-1], out_features)
        if isinstance(input, PackedSequence):
            # No reordering: on meta the indices have no values to reorder by, and
            # the synthetic batch's equal lengths make every order the same.
            return PackedSequence(out, input.batch_sizes), None
        return out, None


def _replace_recurrent(model: nn.Module, backend: str) -> None:
    for name, module in list(model.named_children()):
        if isinstance(module, nn.RNNBase):
            setattr(model, name, _RecurrentStandIn(module, backend))
        else:
            _replace_recurrent(module, backend)


class _MetaTracker(AllocationTracker):
    """The tracker plus meta kernels for CTC, which has none.

    ``_ctc_loss`` returns the per-utterance loss ``(B,)`` and ``log_alpha``
    ``(B, T, 2 U + 1)``, saved for backward; its backward returns the gradient
    like ``log_probs`` (and holds ``log_beta``, see ``_KERNEL_SCRATCH`` in
    :mod:`stagetune.optim.tracker`).
    """

    def __init__(self, max_target_len: int) -> None:
        super().__init__()
        self.max_target_len = max_target_len

    def _run(self, func: Any, args: Any, kwargs: Any) -> Any:
        packet = getattr(func, "overloadpacket", None)
        if packet is torch.ops.aten._ctc_loss and args[0].device.type == "meta":
            steps, batch = args[0].shape[:2]
            alpha = (batch, steps, 2 * self.max_target_len + 1)
            return args[0].new_empty(batch), args[0].new_empty(alpha)
        if packet is torch.ops.aten._ctc_loss_backward and args[1].device.type == "meta":
            return torch.empty_like(args[1])
        return func(*args, **kwargs)


def estimate_step(
    config: Config,
    feat_dim: int,
    num_outputs: int,
    *,
    batch_size: int,
    max_frames: int,
    max_target_len: int,
    device: torch.device | str = "cuda",
    base: Config | None = None,
) -> Footprint:
    """Estimate one training step's peak bytes without device memory.

    Runs :func:`run_synthetic_step` on the meta device under the tracker, with
    recurrent layers replaced by stand-ins that allocate what the ``device``
    type's kernels keep (:data:`RECURRENT_COSTS`).  Convolutions, the output
    layer, the loss, gradients and the optimizer state are the real
    operators' shapes.  On CUDA with autocast the estimate is of the float32
    step, so it reads high.  Takes well under a second.

    Args:
        device: The device type the estimate is for (cuda or cpu kernels).
        base: The config of a base model the trial adapts (:class:`SyntheticStep`).
    """
    device = torch.device(device)
    key = footprint_key(
        config, feat_dim, num_outputs, batch_size, max_frames, max_target_len, device=device, base=base
    )
    backend = "cuda" if device.type == "cuda" else "cpu"
    start = time.perf_counter()
    tracker = _MetaTracker(max_target_len)
    with torch.random.fork_rng(devices=[]), tracker:
        run_synthetic_step(
            config,
            feat_dim,
            num_outputs,
            batch_size=batch_size,
            max_frames=max_frames,
            max_target_len=max_target_len,
            device="meta",
            prepare=lambda model: _replace_recurrent(model, backend),
            base=base,
        )
    return Footprint(int(tracker.peak), "meta-estimate", time.perf_counter() - start, key)
