"""Peak memory of one training step, measured or estimated before a trial trains.

Before a trial trains, the optimizer checks that the trial's largest batch fits
in ``--mem-limit-bytes``.  One *training step* here is exactly what
:func:`stagetune.training.train_one_epoch` does per batch: forward, task loss,
backward, gradient clipping and ``optimizer.step()``, on a synthetic largest
batch (``batch_size`` utterances of ``max_frames`` frames, ``max_target_len``
CTC tokens).  The optimizer state is allocated *before* the measured step (one
step with zero gradients), so the figure is that of a steady-state step, where
Adam's two moments are alive during forward and backward, not of the first
step, where they do not exist yet (that would understate by two parameter
copies).

Methods (:attr:`Footprint.method`):

* ``"cuda"``: ``torch.cuda.max_memory_allocated`` over the step, minus what was
  allocated before the model was built.  Included: parameters, gradients,
  optimizer state, the batch, activations, cuDNN reserve and work spaces and
  every other tensor of the caching allocator.  Not included: the CUDA context
  (a few hundred MB per process), the caching allocator's fragmentation
  (``memory_reserved - memory_allocated``) and anything another process holds;
  leave room for those in the limit.
* ``"cpu-tracker"``: :class:`AllocationTracker`, a ``TorchDispatchMode`` that
  counts the storage of every tensor an operator returns, once per storage,
  and subtracts it when the storage is freed (a ``weakref.finalize`` on the
  storage).  The model and optimizer are built inside the mode, so
  parameters, gradients (the autograd engine accumulates them on this thread,
  through the mode) and optimizer state are all seen.  Buffers a kernel
  allocates and frees internally never pass the mode; for the kernels where
  they matter (oneDNN convolutions and LSTM, CTC's backward) the tracker adds
  them from the operator's arguments (``_KERNEL_SCRATCH``).
* ``"meta-estimate"``: :func:`estimate_step` runs the same step on the meta
  device under the tracker (no data, no memory).  Recurrent layers are
  replaced by a stand-in that keeps, for backward, what the real kernel keeps
  (:data:`RECURRENT_COSTS`), because on meta PyTorch decomposes LSTM/GRU into
  per-time-step operators (tens of seconds for long utterances) and, on CPU,
  the real LSTM is oneDNN's, whose workspace (15 to 21 H floats per frame,
  layer and direction) is not what the decomposition keeps.  On CPU the
  estimate lands within 0.96 to 1.13 of the tracker; the CUDA rows are not
  yet checked on a GPU.

Validating the tracker ("the other way", :func:`allocator_peak_bytes`): the
same step runs under ``torch.profiler`` with ``profile_memory=True``, which
records every allocation and free of c10's CPU allocator, kernel-internal
buffers included; the maximum of their running sum is the allocator's peak.
Its error sources: memory not allocated through c10 (oneDNN primitive
caches, OpenMP/BLAS buffers, Python objects) is missed, and only growth
over the window's start is seen (the step frees only what it allocated, so
nothing is lost).  The tracker/allocator ratio is 1.00 to 1.09 on the
configurations of ``bench/memory_accuracy.py`` (above 1 where the modelled
kernel scratch is generous).  That bench also prints the growth of the peak
RSS in a fresh process, a cruder check that reads 0.6 to 1.5 times the
tracker: resident memory only counts touched pages (oneDNN's LSTM workspace
is sized for more than the forward writes: RSS reads low), and it counts the
heap's fragmentation from the thousands of small per-step tensors of GRU
cells, Python objects and lazily mapped code (RSS reads high).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, MutableMapping

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter

from stagetune.config import Config, active, flatten, iter_fields
from stagetune.failures import is_out_of_memory
from stagetune.model import TASKS, build_model
from stagetune.training import make_optimizer

__all__ = [
    "Footprint",
    "AllocationTracker",
    "RecurrentCost",
    "RECURRENT_COSTS",
    "footprint_key",
    "run_synthetic_step",
    "measure_step",
    "estimate_step",
    "check_footprint",
    "allocator_peak_bytes",
]

#: Bump when what a footprint measures changes, so cached figures are not reused.
_KEY_VERSION = 1


@dataclass(frozen=True)
class Footprint:
    """Peak memory of one training step.

    Attributes:
        bytes: Peak bytes of the step (see the module docstring for what each
            method includes).
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


class AllocationTracker(TorchDispatchMode):
    """Counts live tensor storage bytes and their running peak.

    Every tensor an operator returns is counted once per storage (keyed by
    the storage's ``StorageImpl``, which views share) and uncounted when the
    storage is freed.  Works on any device, meta included (meta storages have
    sizes but no data).  Tensors created before the mode was entered are
    counted when an operator first returns them, so build what you measure
    inside the mode.

    Attributes:
        current: Bytes of tracked storages alive now.
        peak: Highest ``current`` seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def track(self, tensor: Tensor) -> None:
        """Count ``tensor``'s storage if it is not counted yet (or grew)."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse and other storage-less layouts
            return
        key, size = storage._cdata, storage.nbytes()
        counted = self._live.get(key)
        if counted is None:
            self._live[key] = size
            weakref.finalize(storage, self._release, key)
            self.current += size
        elif size > counted:  # resized in place (out= ops)
            self._live[key] = size
            self.current += size - counted
        self.peak = max(self.peak, self.current)

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _run(self, func: Any, args: Any, kwargs: Any) -> Any:
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = self._run(func, args, kwargs or {})
        for item in tree_iter(out):
            if isinstance(item, Tensor):
                self.track(item)
        scratch = _KERNEL_SCRATCH.get(getattr(func, "overloadpacket", None))
        if scratch is not None:
            named = {a.name: v for a, v in zip(func._schema.arguments, args)} | (kwargs or {})
            self.peak = max(self.peak, self.current + scratch(named, out))
        return out


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _rnn_scratch(a: dict[str, Any], weights: tuple[str, str], extra: str | None) -> int:
    w_ih, w_hh = a[weights[0]], a[weights[1]]
    frames = a["input"].numel() // a["input"].size(-1)
    gates = frames * w_ih.size(0) * w_ih.element_size()
    return (1 if extra is None else 2) * (_nbytes(w_ih) + _nbytes(w_hh)) + gates + (
        0 if extra is None else _nbytes(a[extra])
    )


#: Operator -> bytes its kernel holds internally (freed before it returns)
#: while its outputs exist, as ``f(named arguments, outputs)``.  Read off the
#: allocator profiler (torch 2.13, CPU): oneDNN convolutions reorder the output
#: to a blocked layout, their backward the gradient and twice the input;
#: oneDNN's LSTM reorders its weights and keeps the gates of every frame in a
#: scratchpad (backward: weights twice, plus the incoming gradient); CTC's
#: backward holds ``log_beta``, the size of ``log_alpha``.
_KERNEL_SCRATCH: dict[Any, Callable[[dict[str, Any], Any], int]] = {
    torch.ops.aten.convolution: lambda a, out: _nbytes(out),
    torch.ops.aten.convolution_backward: lambda a, out: (
        _nbytes(a["grad_output"]) + 2 * _nbytes(a["input"])
    ),
    torch.ops.aten.mkldnn_rnn_layer: lambda a, out: _rnn_scratch(a, ("weight0", "weight1"), None),
    torch.ops.aten.mkldnn_rnn_layer_backward: lambda a, out: _rnn_scratch(
        a, ("weight1", "weight2"), "grad_output"
    ),
    torch.ops.aten._ctc_loss_backward: lambda a, out: _nbytes(a["log_alpha"]),
}


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
) -> str:
    """A stable key for everything that changes a step's memory.

    Hashes the active ``[model]`` fields (inactive ones, e.g. conv kernel
    sizes without conv layers, change nothing), the optimizer and whether it
    keeps momentum or decays weights (state and temporaries), whether dropout
    is on, the batch geometry, the device type and the compute dtype
    (default dtype, autocast on CUDA).  Learning rates, seeds and the like are
    left out, so trials differing only in those share one measurement.
    """
    device = torch.device(device)
    t = config.training
    values = flatten(config)
    payload = {
        "version": _KEY_VERSION,
        "model": {
            info.key: values[info.name]
            for info in iter_fields()
            if info.section == "model" and active(info, values)
        },
        "optimizer": t.optimizer,
        "momentum": t.optimizer == "sgd" and t.momentum > 0,
        "weight_decay": t.weight_decay > 0,
        "dropout": t.dropout_prob > 0,
        "sizes": [feat_dim, num_outputs, batch_size, max_frames, max_target_len],
        "device": device.type,
        "dtype": str(torch.get_default_dtype()),
        "autocast": device.type == "cuda" and t.autocast,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"step-v{_KEY_VERSION}-{digest[:24]}"


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
) -> None:
    """Build the model and optimizer on ``device`` and run one step on the largest batch.

    The batch: feats ``(batch_size, max_frames, feat_dim)`` with every length
    ``max_frames``; CTC targets ``(batch_size, max_target_len)`` in
    ``1..num_outputs-1``, frame targets ``(batch_size, max_frames)`` labels.
    Everything is freed on return.  On the meta device the feature lengths
    stay on the CPU (the model reads them as numbers).

    Args:
        prepare: Called with the model before the optimizer is made (the
            estimate swaps recurrent layers here).
    """
    device = torch.device(device)
    _check_sizes(feat_dim, num_outputs, batch_size, max_frames, max_target_len)
    task = TASKS[config.model.task]
    t = config.training
    lengths_device = torch.device("cpu") if device.type == "meta" else device
    with torch.device(device):
        model = build_model(config, feat_dim, num_outputs)
    if prepare is not None:
        prepare(model)
    optimizer = make_optimizer(model, config)
    # A step with zero gradients allocates the optimizer state up front.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    feats = torch.randn(batch_size, max_frames, feat_dim, device=device)
    feat_lens = torch.full((batch_size,), max_frames, dtype=torch.long, device=lengths_device)
    if config.model.task == "frame":
        targets = torch.randint(0, num_outputs, (batch_size, max_frames), device=device)
        target_lens = torch.full((batch_size,), max_frames, dtype=torch.long, device=device)
    else:
        # On meta, concatenated targets: unpadding them would need their values.
        meta = device.type == "meta"
        shape = (batch_size * max_target_len,) if meta else (batch_size, max_target_len)
        targets = torch.randint(1, max(num_outputs, 2), shape, device=device)
        target_lens = torch.full((batch_size,), max_target_len, dtype=torch.long, device=device)
    use_amp = device.type == "cuda" and t.autocast
    with torch.autocast("cuda") if use_amp else nullcontext():
        logits, out_lens = model(feats, feat_lens)
        loss = task.loss(logits, out_lens, targets, target_lens, time_stride=model.time_stride)
    loss.backward()  # logits and loss stay referenced, as in train_one_epoch
    if t.clip_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
    optimizer.step()


def _method(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu-tracker"


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_step(
    config: Config,
    feat_dim: int,
    num_outputs: int,
    *,
    batch_size: int,
    max_frames: int,
    max_target_len: int,
    device: torch.device | str,
) -> Footprint:
    """Measure one real training step's peak bytes on ``device`` (cuda or cpu).

    Allocates the real step: on CPU make sure it fits in RAM first
    (:func:`check_footprint` does).  The global RNG state is left untouched.

    Raises:
        ValueError: For a device that is neither cuda nor cpu.
        RuntimeError / torch.OutOfMemoryError: When the step does not fit.
    """
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"measure_step needs a cuda or cpu device, got {device}; use estimate_step for others"
        )
    key = footprint_key(
        config, feat_dim, num_outputs, batch_size, max_frames, max_target_len, device=device
    )
    sizes = dict(batch_size=batch_size, max_frames=max_frames, max_target_len=max_target_len)
    start = time.perf_counter()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        _release_memory(device)
        torch.cuda.synchronize(index)
        baseline = torch.cuda.memory_allocated(index)
        torch.cuda.reset_peak_memory_stats(index)
        try:
            with torch.random.fork_rng(devices=[index]):
                run_synthetic_step(config, feat_dim, num_outputs, device=device, **sizes)
            torch.cuda.synchronize(index)
            peak = torch.cuda.max_memory_allocated(index) - baseline
        finally:
            _release_memory(device)
    else:
        tracker = AllocationTracker()
        try:
            with torch.random.fork_rng(devices=[]), tracker:
                run_synthetic_step(config, feat_dim, num_outputs, device=device, **sizes)
        finally:
            _release_memory(device)
        peak = tracker.peak
    return Footprint(int(peak), _method(device), time.perf_counter() - start, key)


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
    like ``log_probs`` (and holds ``log_beta``, see ``_KERNEL_SCRATCH``).
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
    """
    device = torch.device(device)
    key = footprint_key(
        config, feat_dim, num_outputs, batch_size, max_frames, max_target_len, device=device
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
        )
    return Footprint(int(tracker.peak), "meta-estimate", time.perf_counter() - start, key)


def _capacity_bytes(device: torch.device) -> int:
    """Total memory of the device (physical RAM for cpu)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


#: An estimate above this multiple of the limit prunes without measuring (the
#: estimate was within 0.96-1.13x of the tracker on CPU; see bench/memory_accuracy.py).
_CLEARLY_OVER = 2.0


def check_footprint(
    config: Config,
    feat_dim: int,
    num_outputs: int,
    *,
    batch_size: int,
    max_frames: int,
    max_target_len: int,
    device: torch.device | str,
    limit_bytes: int | None,
    cache: MutableMapping[str, int] | None = None,
) -> Footprint:
    """The step's footprint as the optimizer needs it before a trial trains.

    Uses ``cache[key]`` when present (the study keeps one figure per
    architecture), else measures on ``device`` (:func:`measure_step`), and
    stores the figure in ``cache``.  An estimate over twice the limit is the
    answer without a measurement.  On CPU the real step is only run when
    the estimate fits in the RAM available now; otherwise the estimate is
    the answer (running it would invite the kernel's OOM killer, which no
    ``except`` catches).  When measuring runs out of memory the footprint's
    ``bytes`` exceed both ``limit_bytes`` and the device's capacity and its
    method ends in ``-oom``; compare with :meth:`Footprint.fits`.

    Args:
        limit_bytes: The budget (``--mem-limit-bytes``); ``None`` for none.
        cache: Architecture key -> bytes, read and written.
    """
    device = torch.device(device)
    key = footprint_key(
        config, feat_dim, num_outputs, batch_size, max_frames, max_target_len, device=device
    )
    if cache is not None and key in cache:
        return Footprint(int(cache[key]), "cached", 0.0, key)
    sizes = dict(batch_size=batch_size, max_frames=max_frames, max_target_len=max_target_len)
    start = time.perf_counter()
    footprint: Footprint | None = None
    if device.type != "cuda" or limit_bytes is not None:
        estimate = estimate_step(config, feat_dim, num_outputs, device=device, **sizes)
        if device.type != "cuda" and estimate.bytes > _available_ram_bytes():
            footprint = estimate
        elif limit_bytes is not None and estimate.bytes > _CLEARLY_OVER * limit_bytes:
            # Far over budget: measuring would only confirm it, at the cost of a real step.
            footprint = estimate
    if footprint is None:
        try:
            footprint = measure_step(config, feat_dim, num_outputs, device=device, **sizes)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is an answer
            if not is_out_of_memory(exc):
                raise
    if footprint is None:  # out of memory
        _release_memory(device)  # the traceback held the step's tensors until here
        above = max(limit_bytes or 0, _capacity_bytes(device)) + 1
        footprint = Footprint(above, f"{_method(device)}-oom", time.perf_counter() - start, key)
    if cache is not None:
        cache[key] = footprint.bytes
    return footprint


def allocator_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes held by c10's CPU allocator while ``fn()`` runs, above the start.

    The independent check of :class:`AllocationTracker`: ``torch.profiler``
    with ``profile_memory=True`` reports every CPU allocation and free (kernel
    scratch included); the maximum of their running sum is the peak.  The
    result of ``fn`` is dropped inside the window.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = torch._C._autograd.DeviceType.CPU
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == cpu
    ]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak
