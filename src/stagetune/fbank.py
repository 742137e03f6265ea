"""Kaldi log-mel filterbank features of one utterance, with kaldi-native-fbank.

Frames follow Kaldi's ``compute-fbank-feats`` with ``snip_edges=true``; samples
are on the int16 scale, as Kaldi reads them.
"""

from __future__ import annotations

import numpy as np

from stagetune.errors import UsageError

__all__ = ["MIN_MEL_BINS", "num_frames", "compute_fbank"]

#: Kaldi's (and kaldi-native-fbank's) smallest filterbank.
MIN_MEL_BINS = 3


def num_frames(
    num_samples: int,
    sample_rate: int,
    *,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
) -> int:
    """Kaldi's frame count with ``snip_edges=true``: ``1 + (N - length) // shift``.

    Returns 0 when the audio is shorter than one frame.
    """
    frame_length = int(sample_rate * 0.001 * frame_length_ms)
    frame_shift = int(sample_rate * 0.001 * frame_shift_ms)
    if num_samples < frame_length:
        return 0
    return 1 + (num_samples - frame_length) // frame_shift


def _max_mel_bins(sample_rate: int, frame_length_ms: float) -> int:
    """The most mel bins kaldi-native-fbank accepts at this rate and frame length."""
    import kaldi_native_fbank as knf

    def fits(bins: int) -> bool:
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(sample_rate)
        opts.frame_opts.frame_length_ms = float(frame_length_ms)
        opts.mel_opts.num_bins = bins
        try:
            knf.OnlineFbank(opts)
        except ValueError:
            return False
        return True

    low, high = MIN_MEL_BINS, 2 * MIN_MEL_BINS  # fits(low) (or nothing does), not fits(high)
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def compute_fbank(
    samples: np.ndarray,
    sample_rate: int,
    *,
    num_mel_bins: int = 40,
    dither: float = 0.0,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Log-mel filterbank features of one utterance with kaldi-native-fbank.

    Args:
        samples: 1-D samples on the int16 scale (int16 or float).
        sample_rate: Rate of ``samples`` in Hz.
        num_mel_bins: Mel bins (feature dimension D).
        dither: Standard deviation of Gaussian noise added to the samples (Kaldi's
            ``--dither``); drawn from ``rng`` so results are reproducible.
        frame_length_ms: Window length.
        frame_shift_ms: Window shift.
        rng: Source of the dither noise; required when ``dither > 0``.

    Returns:
        float32 array (T, D), T as given by :func:`num_frames`.
    """
    import kaldi_native_fbank as knf

    waveform = np.asarray(samples, dtype=np.float32)
    if dither > 0.0:
        if rng is None:
            raise ValueError("dither > 0 needs an rng so that features are reproducible")
        # Added here rather than by knf, whose dither is unseeded.
        waveform = waveform + np.float32(dither) * rng.standard_normal(
            waveform.shape[0], dtype=np.float32
        )
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(sample_rate)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.frame_length_ms = float(frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(frame_shift_ms)
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = int(num_mel_bins)
    try:
        fbank = knf.OnlineFbank(opts)
    except ValueError as exc:
        if "num_mel_bins" not in str(exc):
            raise
        raise UsageError(
            f"--num-mel-bins {num_mel_bins} is too many for {sample_rate} Hz audio in "
            f"{frame_length_ms:g} ms frames (some mel bins would cover no FFT bin); use at "
            f"most {_max_mel_bins(sample_rate, frame_length_ms)}"
        ) from None
    fbank.accept_waveform(float(sample_rate), waveform)
    fbank.input_finished()
    count = fbank.num_frames_ready
    if count == 0:
        return np.zeros((0, num_mel_bins), dtype=np.float32)
    # np.array copies: get_frame's buffer belongs to the extractor.
    return np.stack([np.array(fbank.get_frame(i), dtype=np.float32) for i in range(count)])

