"""SpecAugment-style masking and additive noise on padded feature batches."""

from __future__ import annotations

import torch

from stagetune.config import TrainingConfig

__all__ = ["augment_batch", "augmentation_enabled"]


def augmentation_enabled(config: TrainingConfig) -> bool:
    """Whether :func:`augment_batch` would change anything."""
    return config.num_time_mask > 0 or config.num_freq_mask > 0 or config.noise_eps > 0


def augment_batch(
    feats: torch.Tensor,
    feat_lens: torch.Tensor,
    config: TrainingConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask time/frequency bands and add noise, in place where possible.

    Args:
        feats: (B, T, F) padded features.
        feat_lens: (B,) valid frames per utterance; masks stay inside them.
        config: Mask counts and widths, noise level.
        generator: CPU generator for reproducible masks.

    Returns:
        The augmented (B, T, F) tensor.
    """
    batch, frames, bins = feats.shape
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
