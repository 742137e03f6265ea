"""SpecAugment-style masking, frequency warping and additive noise on padded feature batches."""

from __future__ import annotations

import torch

from stagetune.config import TrainingConfig

__all__ = ["augment_batch", "augmentation_enabled", "warp_frequency"]


def augmentation_enabled(config: TrainingConfig) -> bool:
    """Whether :func:`augment_batch` would change anything."""
    return (
        config.num_time_mask > 0 or config.num_freq_mask > 0 or config.noise_eps > 0 or config.freq_warp > 0
    )


def warp_frequency(feats: torch.Tensor, max_warp: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Stretch each utterance's frequency axis by a random factor in [1 - max_warp, 1 + max_warp].

    A feature-domain stand-in for vocal tract length perturbation: output bin
    ``i`` reads the input at ``i / alpha`` (linear interpolation, the top bin
    repeated past the edge), so ``alpha > 1`` moves spectral peaks up the way
    a shorter vocal tract does.  Meaningful for filterbank features, whose bins
    are ordered by frequency.
    """
    batch, frames, bins = feats.shape
    alpha = 1.0 + (torch.rand(batch, generator=generator) * 2.0 - 1.0) * max_warp
    source = (torch.arange(bins, dtype=torch.float32)[None, :] / alpha[:, None]).clamp(max=bins - 1)
    low = source.floor().long()
    high = (low + 1).clamp(max=bins - 1)
    frac = (source - low).to(feats.device, feats.dtype)[:, None, :]
    low = low.to(feats.device)[:, None, :].expand(batch, frames, bins)
    high = high.to(feats.device)[:, None, :].expand(batch, frames, bins)
    return feats.gather(2, low) * (1 - frac) + feats.gather(2, high) * frac


def augment_batch(
    feats: torch.Tensor,
    feat_lens: torch.Tensor,
    config: TrainingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Warp the frequency axis, mask time/frequency bands and add noise.

    Args:
        feats: (B, T, F) padded features.
        feat_lens: (B,) valid frames per utterance; masks stay inside them.
        config: Warp range, mask counts and widths, noise level.
        generator: CPU generator for reproducible masks.

    Returns:
        The augmented (B, T, F) tensor.
    """
    batch, frames, bins = feats.shape
    if config.freq_warp > 0:
        feats = warp_frequency(feats, config.freq_warp, generator)
    if config.noise_eps > 0:
        noise = torch.randn(feats.shape, generator=generator) * config.noise_eps
        feats = feats + noise.to(feats.device, feats.dtype)
    if config.num_time_mask == 0 and config.num_freq_mask == 0:
        return feats
    keep = torch.ones(batch, frames, bins, dtype=torch.bool)
    lens = feat_lens.cpu()
    for _ in range(config.num_time_mask):
        width = torch.randint(0, config.max_time_mask + 1, (batch,), generator=generator)
        width = torch.minimum(width, lens)
        start = (torch.rand(batch, generator=generator) * (lens - width + 1)).long()
        pos = torch.arange(frames)
        band = (pos >= start[:, None]) & (pos < (start + width)[:, None])
        keep &= ~band[:, :, None]
    for _ in range(config.num_freq_mask):
        width = torch.randint(0, min(config.max_freq_mask, bins) + 1, (batch,), generator=generator)
        start = (torch.rand(batch, generator=generator) * (bins - width + 1)).long()
        pos = torch.arange(bins)
        band = (pos >= start[:, None]) & (pos < (start + width)[:, None])
        keep &= ~band[:, None, :]
    return feats * keep.to(feats.device, feats.dtype)
