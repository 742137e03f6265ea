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
copies).  A study that adapts a base model (``optim init --adapt-from``)
builds the base beside the model, frozen, and runs its forward under
``no_grad`` in every step as training does (``training.adapt_rho > 0``): its
parameters and that forward's activations are in every figure.

Methods (:attr:`Footprint.method`):

* ``"cuda"``: ``torch.cuda.max_memory_allocated`` over the step, minus what was
  allocated before the model was built.  Included: parameters, gradients,
  optimizer state, the batch, activations, cuDNN reserve and work spaces and
  every other tensor of the caching allocator.  Not included: the CUDA context
  (a few hundred MB per process), the caching allocator's fragmentation
  (``memory_reserved - memory_allocated``) and anything another process holds;
  leave room for those in the limit.
* ``"cpu-tracker"``: :class:`AllocationTracker` (in
  :mod:`stagetune.optim.tracker`), a ``TorchDispatchMode`` that counts the
  storage of every tensor an operator returns, once per storage, and
  subtracts it when the storage is freed (a ``weakref.finalize`` on the
  storage).  The model and optimizer are built inside the mode, so
  parameters, gradients (the autograd engine accumulates them on this thread,
  through the mode) and optimizer state are all seen.  Buffers a kernel
  allocates and frees internally never pass the mode; for the kernels where
  they matter (oneDNN convolutions and LSTM, CTC's backward) the tracker adds
  them from the operator's arguments (``_KERNEL_SCRATCH``).
* ``"meta-estimate"``: :func:`estimate_step` (in
  :mod:`stagetune.optim.estimate`) runs the same step on the meta device
  under the tracker (no data, no memory).  Recurrent layers are replaced
  by a stand-in that keeps, for backward, what the real kernel keeps
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

Layout, in the direction the data flows: :mod:`stagetune.optim.tracker`
counts allocations; :mod:`stagetune.optim.estimate` defines the synthetic
step (:func:`run_synthetic_step`), its key and :class:`Footprint`, and the
meta estimate; this module measures the step (:func:`measure_step`), decides
which figure a trial gets (:func:`check_footprint`) and validates the
tracker (:func:`allocator_peak_bytes`).  Everything in ``__all__`` is
importable from here.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable, MutableMapping

import torch

from stagetune.config import Config
from stagetune.failures import is_out_of_memory
from stagetune.optim.estimate import (
    RECURRENT_COSTS,
    Footprint,
    RecurrentCost,
    SyntheticStep,
    estimate_step,
    footprint_key,
    run_synthetic_step,
)
from stagetune.optim.tracker import AllocationTracker

__all__ = [
    "Footprint",
    "AllocationTracker",
    "RecurrentCost",
    "RECURRENT_COSTS",
    "footprint_key",
    "SyntheticStep",
    "run_synthetic_step",
    "measure_step",
    "estimate_step",
    "check_footprint",
    "allocator_peak_bytes",
]


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
    then: Callable[[SyntheticStep], Any] | None = None,
    base: Config | None = None,
) -> Footprint:
    """Measure one real training step's peak bytes on ``device`` (cuda or cpu).

    Allocates the real step: on CPU make sure it fits in RAM first
    (:func:`check_footprint` does).  The global RNG state is left untouched.

    Args:
        then: Called with the built step once the measured step has run and
            its peak is read, outside the measurement (the time check times
            a step here: the measured one was its warm-up).
        base: The config of a base model the trial adapts (:class:`SyntheticStep`).

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
        config, feat_dim, num_outputs, batch_size, max_frames, max_target_len, device=device, base=base
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
                step = SyntheticStep(config, feat_dim, num_outputs, device=device, base=base, **sizes)
                step()
                torch.cuda.synchronize(index)
                peak = torch.cuda.max_memory_allocated(index) - baseline
                seconds = time.perf_counter() - start
                if then is not None:
                    then(step)
                del step
        finally:
            _release_memory(device)
    else:
        tracker = AllocationTracker()
        try:
            with torch.random.fork_rng(devices=[]):
                with tracker:
                    step = SyntheticStep(config, feat_dim, num_outputs, device=device, base=base, **sizes)
                    step()
                peak = tracker.peak
                seconds = time.perf_counter() - start
                if then is not None:  # outside the tracker, which slows every operator
                    then(step)
                del step
        finally:
            _release_memory(device)
    return Footprint(int(peak), _method(device), seconds, key)


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
    then: Callable[[SyntheticStep], Any] | None = None,
    base: Config | None = None,
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
        then: Passed to :func:`measure_step`; called only when the step is
            measured (not for a cached figure or an estimate).
        base: The config of a base model the trial adapts (``optim init
            --adapt-from``): its parameters and forward are counted.
    """
    device = torch.device(device)
    key = footprint_key(
        config, feat_dim, num_outputs, batch_size, max_frames, max_target_len, device=device, base=base
    )
    if cache is not None and key in cache:
        return Footprint(int(cache[key]), "cached", 0.0, key)
    sizes = dict(batch_size=batch_size, max_frames=max_frames, max_target_len=max_target_len)
    start = time.perf_counter()
    footprint: Footprint | None = None
    if device.type != "cuda" or limit_bytes is not None:
        estimate = estimate_step(config, feat_dim, num_outputs, device=device, base=base, **sizes)
        if device.type != "cuda" and estimate.bytes > _available_ram_bytes():
            footprint = estimate
        elif limit_bytes is not None and estimate.bytes > _CLEARLY_OVER * limit_bytes:
            # Far over budget: measuring would only confirm it, at the cost of a real step.
            footprint = estimate
    if footprint is None:
        try:
            footprint = measure_step(config, feat_dim, num_outputs, device=device, then=then, base=base, **sizes)
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
