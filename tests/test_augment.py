"""SpecAugment masks and noise (``stagetune.augment``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stagetune.augment import augment_batch, augmentation_enabled
from stagetune.config import TrainingConfig

torch.set_num_threads(1)

LENS = torch.tensor([40, 3, 1, 25, 17, 40])
FRAMES, BINS = 40, 12


def config(**values: object) -> TrainingConfig:
    base = dict(num_time_mask=0, num_freq_mask=0, noise_eps=0.0)
    return dataclasses.replace(TrainingConfig(), **{**base, **values})


def ones() -> torch.Tensor:
    """(B, T, F) ones, padding included, so any change is visible."""
    return torch.ones(len(LENS), FRAMES, BINS)


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, width) of the true runs of a 1-D bool tensor."""
    found, start = [], None
    for i, value in enumerate(mask.tolist() + [False]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            found.append((start, i - start))
            start = None
    return found


def test_enabled_only_when_something_changes() -> None:
    assert not augmentation_enabled(config())
    assert augmentation_enabled(config(num_time_mask=1))
    assert augmentation_enabled(config(num_freq_mask=1))
    assert augmentation_enabled(config(noise_eps=0.1))


def test_nothing_enabled_leaves_features_alone() -> None:
    feats = torch.randn(len(LENS), FRAMES, BINS)
    assert torch.equal(augment_batch(feats.clone(), LENS, config()), feats)


@pytest.mark.parametrize("seed", range(20))
def test_time_masks_stay_inside_each_utterance_and_within_max_width(seed: int) -> None:
    cfg = config(num_time_mask=2, max_time_mask=6)
    out = augment_batch(ones(), LENS, cfg, torch.Generator().manual_seed(seed))
    for b, length in enumerate(LENS.tolist()):
        masked_frames = (out[b] == 0).all(dim=1)
        # Whole frames are masked, nothing else.
        assert torch.equal(out[b] == 0, masked_frames[:, None].expand(-1, BINS))
        assert not masked_frames[length:].any(), "a mask reached into the padding"
        assert int(masked_frames.sum()) <= min(2 * cfg.max_time_mask, length)
        for _, width in runs(masked_frames):
            assert width <= 2 * cfg.max_time_mask  # two masks may touch


def test_one_time_mask_is_one_band_no_wider_than_max_or_utterance() -> None:
    widths = []
    for seed in range(50):
        out = augment_batch(ones(), LENS, config(num_time_mask=1, max_time_mask=6),
                            torch.Generator().manual_seed(seed))
        for b, length in enumerate(LENS.tolist()):
            bands = runs((out[b] == 0).all(dim=1))
            assert len(bands) <= 1
            if bands:
                start, width = bands[0]
                assert width <= min(6, length) and start + width <= length
                widths.append(width)
    assert max(widths) == 6, "the full width is never drawn"


@pytest.mark.parametrize("max_freq_mask", [3, 50])
def test_frequency_masks_are_bands_within_bins_and_max_width(max_freq_mask: int) -> None:
    for seed in range(30):
        out = augment_batch(ones(), LENS, config(num_freq_mask=1, max_freq_mask=max_freq_mask),
                            torch.Generator().manual_seed(seed))
        for b in range(len(LENS)):
            masked_bins = (out[b] == 0).all(dim=0)
            assert torch.equal(out[b] == 0, masked_bins[None, :].expand(FRAMES, -1))
            bands = runs(masked_bins)
            assert len(bands) <= 1
            assert sum(w for _, w in bands) <= min(max_freq_mask, BINS)


def test_same_generator_seed_gives_the_same_augmentation() -> None:
    cfg = config(num_time_mask=2, max_time_mask=5, num_freq_mask=2, max_freq_mask=4, noise_eps=0.2)
    feats = torch.randn(len(LENS), FRAMES, BINS)
    a = augment_batch(feats.clone(), LENS, cfg, torch.Generator().manual_seed(7))
    b = augment_batch(feats.clone(), LENS, cfg, torch.Generator().manual_seed(7))
    c = augment_batch(feats.clone(), LENS, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augmentation_does_not_use_the_global_generator() -> None:
    cfg = config(num_time_mask=2, num_freq_mask=2, noise_eps=0.2)
    torch.manual_seed(0)
    augment_batch(ones(), LENS, cfg, torch.Generator().manual_seed(1))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)


def test_noise_has_the_configured_scale_and_masks_alone_add_none() -> None:
    feats = torch.zeros(64, 50, 20)
    lens = torch.full((64,), 50)
    noisy = augment_batch(feats, lens, config(noise_eps=0.25), torch.Generator().manual_seed(0))
    assert abs(float(noisy.std()) - 0.25) < 0.01
    assert abs(float(noisy.mean())) < 0.01
    masked = augment_batch(torch.ones(64, 50, 20), lens, config(num_time_mask=1, max_time_mask=3),
                           torch.Generator().manual_seed(0))
    assert set(masked.unique().tolist()) <= {0.0, 1.0}


def test_input_is_not_modified() -> None:
    feats = torch.randn(len(LENS), FRAMES, BINS)
    before = feats.clone()
    augment_batch(feats, LENS, config(num_time_mask=2, num_freq_mask=2, noise_eps=0.1),
                  torch.Generator().manual_seed(0))
    assert torch.equal(feats, before)


def test_frequency_warp_stretches_each_utterance_by_one_factor_within_range() -> None:
    # A ramp over the bins: a warp by alpha reads bin i at i / alpha, so every
    # frame of an utterance shows the same slope 1 / alpha (top bin clamped).
    ramp = torch.arange(BINS, dtype=torch.float32).expand(len(LENS), FRAMES, BINS).clone()
    gen = torch.Generator().manual_seed(3)
    warped = augment_batch(ramp, LENS, config(freq_warp=0.2), gen)
    assert warped.shape == ramp.shape
    slopes = warped[:, :, 1] - warped[:, :, 0]
    assert torch.allclose(slopes, slopes[:, :1].expand_as(slopes))  # one factor per utterance
    alphas = 1 / slopes[:, 0]
    assert ((alphas >= 0.8 - 1e-5) & (alphas <= 1.2 + 1e-5)).all()
    assert alphas.std() > 0.01  # utterances get different factors
    assert warped.min() >= 0 and warped.max() <= BINS - 1  # interpolated, never extrapolated
    assert torch.equal(warped[:, :, 0], ramp[:, :, 0])  # bin 0 stays put


def test_frequency_warp_is_enabled_by_its_field_and_zero_is_identity() -> None:
    assert augmentation_enabled(config(freq_warp=0.1))
    assert not augmentation_enabled(config(freq_warp=0.0))
    feats = torch.randn(len(LENS), FRAMES, BINS, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment_batch(feats, LENS, config(), torch.Generator().manual_seed(1)), feats)
