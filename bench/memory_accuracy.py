"""How close the step-memory figures of ``stagetune.optim.memory`` are, side by side.

For a few conv + recurrent configurations (small to large, GRU and LSTM), one
training step on the largest batch is measured by:

* ``tracker``: the CPU allocation tracker (``measure_step`` on cpu);
* ``alloc``: c10's CPU allocator, every allocation and free recorded by
  ``torch.profiler(profile_memory=True)`` (``allocator_peak_bytes``); it also
  sees kernel-internal scratch the tracker can only model;
* ``rss``: growth of the peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the step in a fresh process, after a
  warm-up step on a tiny batch (kernels loaded, oneDNN primitives created);
  ``ru_maxrss`` would do, but Linux carries the parent's peak over ``exec``.
  Crude: only touched pages count, the heap's fragmentation, Python objects
  and lazily mapped code count, and glibc may reuse freed blocks silently;
* ``estimate``: ``estimate_step`` on the meta device for cpu kernels;
* with CUDA: ``measure_step`` on cuda (``max_memory_allocated``) with
  autocast and in float32, and ``estimate_step`` for cuda kernels (float32),
  with their ratios to the float32 measurement (to calibrate the cuda rows of
  ``RECURRENT_COSTS``, not yet checked on a GPU).

Run: ``.venv/bin/python bench/memory_accuracy.py`` (about a minute on 1 CPU thread).
"""

from __future__ import annotations

import argparse
import gc
import resource
import subprocess
import sys
import time

import torch

from stagetune.config import Config, with_values
from stagetune.optim.memory import (
    allocator_peak_bytes,
    estimate_step,
    measure_step,
    run_synthetic_step,
)

FEAT_DIM = 40
NUM_OUTPUTS = 50

#: name -> (config overrides, batch size, max frames, max target length)
CASES: dict[str, tuple[dict[str, object], int, int, int]] = {
    "small: 2 conv + 2x BiGRU 128": (
        {"model.recurrent_type": "gru", "model.recurrent_size": 128},
        8, 400, 40,
    ),
    "medium: 2 conv + 2x BiLSTM 256": (
        {"model.recurrent_type": "lstm", "model.recurrent_size": 256},
        16, 600, 60,
    ),
    "large: 3 conv + 3x BiGRU 256, frame": (
        {
            "model.convolutional_layers": 3,
            "model.recurrent_type": "gru",
            "model.recurrent_size": 256,
            "model.recurrent_layers": 3,
            "model.task": "frame",
        },
        8, 800, 0,
    ),
    "large: 2 conv + 3x BiLSTM 384": (
        {"model.recurrent_type": "lstm", "model.recurrent_size": 384, "model.recurrent_layers": 3},
        8, 800, 80,
    ),
}


def _case(name: str) -> tuple[Config, dict[str, int]]:
    overrides, batch_size, max_frames, max_target_len = CASES[name]
    sizes = dict(batch_size=batch_size, max_frames=max_frames, max_target_len=max_target_len)
    return with_values(Config(), overrides), sizes


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_child(name: str) -> None:
    """In a fresh process: print the step's peak-RSS growth in bytes."""
    config, sizes = _case(name)
    warm = dict(sizes, batch_size=1, max_frames=min(sizes["max_frames"], 64))
    run_synthetic_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **warm)
    gc.collect()
    try:
        # Reset the peak (VmHWM): ru_maxrss would also carry the parent's peak over exec.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        before = _status_bytes("VmRSS")
        run_synthetic_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
        print(_status_bytes("VmHWM") - before)
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        run_synthetic_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)


def _mb(n: float) -> str:
    return f"{n / 1e6:9.1f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:9.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rss_child:
        rss_child(args.rss_child)
        return
    cuda = torch.cuda.is_available()
    columns = ["tracker", "alloc", "tr/alloc", "rss", "tr/rss", "estimate", "est/tr"]
    if cuda:
        columns += ["cuda_amp", "cuda_fp32", "tr/cuda32", "est_cuda", "est/cuda32"]
    header = f"{'config':38s} " + " ".join(f"{c:>9s}" for c in columns)
    print("MB = 1e6 bytes; peak of one step (forward, loss, backward, clip, optimizer step)")
    print(header + "  seconds(tracker/estimate)")
    started = time.perf_counter()
    for name in CASES:
        config, sizes = _case(name)
        tracked = measure_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
        alloc = allocator_peak_bytes(
            lambda: run_synthetic_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
        )
        child = subprocess.run(
            [sys.executable, __file__, "--rss-child", name],
            check=True, capture_output=True, text=True,
        )
        rss = int(child.stdout.split()[-1])
        estimate = estimate_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
        cells = [
            _mb(tracked.bytes), _mb(alloc), _ratio(tracked.bytes, alloc),
            _mb(rss), _ratio(tracked.bytes, rss),
            _mb(estimate.bytes), _ratio(estimate.bytes, tracked.bytes),
        ]
        if cuda:
            amp = with_values(config, {"training.autocast": True})
            fp32 = with_values(config, {"training.autocast": False})
            with_amp = measure_step(amp, FEAT_DIM, NUM_OUTPUTS, device="cuda", **sizes).bytes
            measured = measure_step(fp32, FEAT_DIM, NUM_OUTPUTS, device="cuda", **sizes).bytes
            cuda_estimate = estimate_step(fp32, FEAT_DIM, NUM_OUTPUTS, device="cuda", **sizes).bytes
            cells += [
                _mb(with_amp), _mb(measured), _ratio(tracked.bytes, measured),
                _mb(cuda_estimate), _ratio(cuda_estimate, measured),
            ]
        line = f"{name:38s} " + " ".join(cells)
        print(f"{line}  {tracked.seconds:.1f}/{estimate.seconds:.2f}", flush=True)
    if cuda:
        print(f"cuda: {torch.cuda.get_device_name()}; cuda_amp with autocast, the others float32")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
