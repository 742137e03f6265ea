"""Tests for stagetune.optim.memory: real models, real measurements."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from stagetune.config import Config, with_values
from stagetune.optim.memory import (
    AllocationTracker,
    Footprint,
    SyntheticStep,
    allocator_peak_bytes,
    check_footprint,
    estimate_step,
    footprint_key,
    measure_step,
    run_synthetic_step,
)

FEAT_DIM = 40
NUM_OUTPUTS = 30


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _config(**values: object) -> Config:
    named = {(key if "." in key else f"model.{key}"): value for key, value in values.items()}
    return with_values(Config(), named)


def _sizes(batch_size: int = 8, max_frames: int = 200, max_target_len: int = 20) -> dict[str, int]:
    return dict(batch_size=batch_size, max_frames=max_frames, max_target_len=max_target_len)


def test_tracker_counts_a_known_allocation_and_its_release():
    with AllocationTracker() as tracker:
        x = torch.empty(1000, 1000)
        assert tracker.current == tracker.peak == 4_000_000
        view = x[:10]  # shares the storage: counted once, kept alive by the view
        del x
        gc.collect()
        assert tracker.current == 4_000_000
        del view
        y = torch.zeros(10)
    assert tracker.current == 40
    assert tracker.peak == 4_000_000
    del y


def test_tracker_sees_parameters_gradients_and_adam_state():
    with AllocationTracker() as tracker:
        layer = torch.nn.Linear(500, 400)
        params = 4 * (500 * 400 + 400)
        assert tracker.current == params
        x = torch.randn(8, 500)
        layer(x).sum().backward()  # .grad is allocated by the autograd engine
        assert tracker.current >= 2 * params
        optimizer = torch.optim.Adam(layer.parameters())
        optimizer.step()  # exp_avg and exp_avg_sq
        assert tracker.current >= 4 * params
        del layer, optimizer, x
        gc.collect()
    assert tracker.current < params


@pytest.mark.parametrize(
    "values",
    [
        {"recurrent_type": "lstm", "recurrent_size": 128},
        {"recurrent_type": "gru", "recurrent_size": 64, "task": "frame"},
    ],
    ids=["conv+BiLSTM ctc", "conv+BiGRU frame"],
)
def test_cpu_tracker_matches_the_allocator_within_20_percent(values):
    config, sizes = _config(**values), _sizes(batch_size=8, max_frames=300)
    tracked = measure_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
    allocated = allocator_peak_bytes(
        lambda: run_synthetic_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
    )
    assert tracked.method == "cpu-tracker"
    assert tracked.bytes > 10_000_000
    assert 0.8 <= tracked.bytes / allocated <= 1.2, (tracked.bytes, allocated)


def test_measured_bytes_grow_with_batch_length_and_recurrent_size():
    def measure(batch_size: int = 4, max_frames: int = 200, recurrent_size: int = 64) -> int:
        config = _config(recurrent_type="lstm", recurrent_size=recurrent_size)
        sizes = _sizes(batch_size=batch_size, max_frames=max_frames)
        return measure_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes).bytes

    base = measure()
    assert measure(batch_size=8) > base
    assert measure(max_frames=400) > base
    assert measure(recurrent_size=128) > base


def test_estimate_grows_with_batch_length_and_recurrent_size():
    def estimate(batch_size: int = 4, max_frames: int = 200, recurrent_size: int = 64) -> int:
        config = _config(recurrent_type="gru", recurrent_size=recurrent_size)
        sizes = _sizes(batch_size=batch_size, max_frames=max_frames)
        return estimate_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes).bytes

    base = estimate()
    assert estimate(batch_size=8) > base
    assert estimate(max_frames=400) > base
    assert estimate(recurrent_size=128) > base


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


def test_estimate_of_a_large_model_is_fast_and_allocates_nothing():
    config = _config(
        convolutional_layers=2, recurrent_type="lstm", recurrent_size=512, recurrent_layers=3
    )
    sizes = _sizes(batch_size=16, max_frames=1500, max_target_len=150)
    # First-call costs (lazy imports, dispatcher caches) are not the estimate's.
    estimate_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **_sizes())
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak RSS (VmHWM)
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    before = _status_bytes("VmRSS")
    started = time.perf_counter()
    footprint = estimate_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes)
    seconds = time.perf_counter() - started
    grown = _status_bytes("VmHWM") - before
    assert footprint.method == "meta-estimate"
    assert seconds < 2.0
    assert footprint.bytes > 1_000_000_000  # 16 x 1500 frames through 3 BiLSTM layers of 512
    assert grown < 50_000_000, grown


@pytest.mark.parametrize(
    "values",
    [
        {"recurrent_type": "lstm", "recurrent_size": 256, "recurrent_layers": 3},
        {"recurrent_type": "gru", "recurrent_size": 128, "convolutional_layers": 3},
        {"recurrent_type": "rnn", "recurrent_size": 256, "task": "frame"},
    ],
    ids=["BiLSTM", "BiGRU", "BiRNN frame"],
)
def test_estimate_is_within_the_documented_factor_of_the_measurement(values):
    # Documented: within 15 % on the bench's configurations; asserted: 0.75 to 1.5.
    config, sizes = _config(**values), _sizes(batch_size=8, max_frames=300)
    measured = measure_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes).bytes
    estimated = estimate_step(config, FEAT_DIM, NUM_OUTPUTS, device="cpu", **sizes).bytes
    assert 0.75 <= estimated / measured <= 1.5, (estimated, measured)


def test_key_ignores_what_does_not_change_memory_and_sees_what_does():
    def key(config: Config, batch_size: int = 8, max_frames: int = 200, device: str = "cpu") -> str:
        sizes = (batch_size, max_frames, 20)
        return footprint_key(config, FEAT_DIM, NUM_OUTPUTS, *sizes, device=device)

    config = _config(recurrent_type="gru")
    assert key(config) == key(_config(recurrent_type="gru"))
    unrelated = {"training.learning_rate": 0.1, "training.seed": 7, "training.dropout_prob": 0.3}
    assert key(with_values(config, unrelated)) == key(config)
    no_conv = _config(convolutional_layers=0)
    assert key(with_values(no_conv, {"model.convolutional_kernel_time": 5})) == key(no_conv)
    different = [
        key(config, batch_size=16),
        key(config, max_frames=400),
        key(config, device="cuda"),
        key(_config(recurrent_type="lstm")),
        key(with_values(config, {"training.optimizer": "sgd"})),
        key(with_values(config, {"training.dropout_prob": 0.0})),
    ]
    assert len({key(config), *different}) == 1 + len(different)


def test_check_footprint_measures_once_then_uses_the_cache():
    config, sizes = _config(recurrent_type="lstm", recurrent_size=64), _sizes(batch_size=4)
    cache: dict[str, int] = {}

    def check() -> Footprint:
        return check_footprint(
            config, FEAT_DIM, NUM_OUTPUTS, device="cpu", limit_bytes=None, cache=cache, **sizes
        )

    first = check()
    assert first.method == "cpu-tracker"
    assert cache == {first.key: first.bytes}
    second = check()
    assert (second.method, second.bytes, second.seconds) == ("cached", first.bytes, 0.0)
    # A figure stored by another worker is taken as is, without measuring.
    cache[first.key] = 123
    assert check().bytes == 123


def test_check_footprint_hands_its_measured_step_to_the_time_check_only_when_it_measures():
    config, sizes = _config(recurrent_type="lstm", recurrent_size=32), _sizes(batch_size=2, max_frames=50)
    cache: dict[str, int] = {}
    seen: list[float] = []

    def then(step: SyntheticStep) -> None:
        assert isinstance(step, SyntheticStep) and step.model.training
        seen.append(step.timed(2))

    def check() -> Footprint:
        return check_footprint(
            config, FEAT_DIM, NUM_OUTPUTS, device="cpu", limit_bytes=None, cache=cache, then=then, **sizes
        )

    first = check()
    assert first.method == "cpu-tracker" and len(seen) == 1 and seen[0] > 0
    assert check().method == "cached" and len(seen) == 1  # nothing built, nothing to time

def test_check_footprint_reports_a_step_above_a_tiny_limit():
    config, sizes = _config(recurrent_type="gru", recurrent_size=32), _sizes(2, 100)
    footprint = check_footprint(
        config, FEAT_DIM, NUM_OUTPUTS, device="cpu", limit_bytes=1000, **sizes
    )
    assert footprint.bytes > 1000
    assert not footprint.fits(1000)
    assert footprint.fits(None)
    # Far over the limit: the estimate decides, no training step is run.
    assert footprint.method == "meta-estimate"


def test_check_footprint_does_not_run_a_step_larger_than_the_ram():
    config = _config(recurrent_type="lstm", recurrent_size=1024, recurrent_layers=4)
    sizes = _sizes(batch_size=2048, max_frames=20000, max_target_len=100)
    started = time.perf_counter()
    footprint = check_footprint(
        config, FEAT_DIM, NUM_OUTPUTS, device="cpu", limit_bytes=10**9, **sizes
    )
    assert footprint.method == "meta-estimate"
    assert not footprint.fits(10**9)
    assert time.perf_counter() - started < 10


def test_check_footprint_turns_an_out_of_memory_error_into_an_oversized_footprint():
    # A real allocation failure: the address space is capped just above what
    # the process uses, so the step's first large tensors cannot be allocated.
    script = textwrap.dedent(
        """
        import resource
        import torch
        from stagetune.config import Config, with_values
        from stagetune.optim.memory import check_footprint, estimate_step
        torch.set_num_threads(1)
        config = with_values(
            Config(), {"model.recurrent_type": "lstm", "model.recurrent_size": 256}
        )
        sizes = dict(batch_size=32, max_frames=1000, max_target_len=50)
        estimate_step(config, 40, 30, device="cpu", **sizes)  # warm up imports before capping
        with open("/proc/self/status") as handle:
            vm = next(
                int(line.split()[1]) * 1024 for line in handle if line.startswith("VmSize:")
            )
        resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
        cache = {}
        footprint = check_footprint(
            config, 40, 30, device="cpu", limit_bytes=None, cache=cache, **sizes
        )
        print(footprint.method, footprint.bytes, cache[footprint.key])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    method, size, cached = result.stdout.split()
    assert method == "cpu-tracker-oom"
    assert int(size) > 10**6 and int(size) == int(cached)
