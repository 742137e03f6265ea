"""A synthetic, speech-like demo corpus: no outside data, no network.

``python -m stagetune.demo OUT_DIR`` writes ``OUT_DIR/{train,dev,test}`` Kaldi data
dirs (``wav/*.wav``, ``wav.scp``, ``text``, ``utt2spk``) and runs
:func:`stagetune.prep.prep_data_dir` on each, so they are ready to train on.

Each token is a sequence of three "phones" from a small inventory (five vowels
with formant targets, one of them also long, two fricative noise bands, a nasal
murmur and a stop burst), synthesised as harmonics of a per-speaker pitch contour
shaped by moving formant resonances.  Tokens share phones and phone pairs on
purpose (``ASI``, ``ISI``, ``ASA``, ``ISA``): a model that sees only a few frames
at a time cannot tell them apart, while one with sentence context (a recurrent
layer, or several conv layers) can.  The same seed gives the same bytes.

Two variants (:data:`VARIANTS`):

* ``hard`` (the default): 12 tokens, eight of them in one confusable group.
  ``AASI`` and ``ISAA`` differ from ``ASI`` and ``ISA`` only in a long "a", and
  since speaking rates span almost a factor of two (and vary per utterance), a
  long "a" of a fast speaker lasts about as long as a short one of a slow
  speaker: only the durations around it tell them apart.  ``AXI`` and ``IXA``
  differ from ``ASI`` and ``ISA`` only in the fricative.  Background noise is
  coloured (white to brown) at 10 to 25 dB SNR, every utterance passes its own
  channel (high-pass, low-pass and spectral tilt, which per-speaker CMVN does
  not remove), and the dev and test speakers sit at opposite edges of the six
  training speakers' range of pitch, formant scale and rate.
* ``easy``: the original corpus: 12 tokens with fewer confusions, white noise at
  15 to 30 dB SNR, no channel, dev and test speakers inside the training range.
  A model that reaches 0% token error on it leaves a search nothing to find.
  Its bytes are those of the corpus before ``hard`` existed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from stagetune.audio import Utterance, to_int16, write_wav_data_dir
from stagetune.errors import DataError, UsageError

__all__ = [
    "DEFAULT_VARIANT",
    "SPEAKERS",
    "Speaker",
    "TOKENS",
    "VARIANTS",
    "Variant",
    "main",
    "make_demo_corpus",
    "synthesize_utterance",
]


@dataclass(frozen=True)
class _Phone:
    """Targets of one phone: formants (Hz), voicing and noise amplitude, noise band."""

    formants: tuple[float, float, float] | None
    voicing: float
    noise: float
    noise_band: tuple[float, float] = (0.0, 0.0)
    duration_ms: float = 100.0


_PHONES: dict[str, _Phone] = {
    "a": _Phone((750, 1250, 2600), 1.0, 0.0, duration_ms=95),
    "i": _Phone((300, 2250, 3050), 0.9, 0.0, duration_ms=85),
    "u": _Phone((330, 850, 2300), 0.9, 0.0, duration_ms=85),
    "e": _Phone((520, 1850, 2600), 0.95, 0.0, duration_ms=90),
    "o": _Phone((520, 900, 2500), 1.0, 0.0, duration_ms=95),
    "m": _Phone((260, 1100, 2300), 0.3, 0.0, duration_ms=70),
    "s": _Phone(None, 0.0, 0.30, (2900.0, 3900.0), duration_ms=90),
    "x": _Phone(None, 0.0, 0.35, (1700.0, 2700.0), duration_ms=90),  # "sh"
    "t": _Phone(None, 0.0, 0.45, (900.0, 3800.0), duration_ms=60),  # closure + burst
}
# A long "a": the short one's targets, 1.8 times as long.
_PHONES["A"] = replace(_PHONES["a"], duration_ms=1.8 * _PHONES["a"].duration_ms)

# Token -> its phones (``x`` is "sh", capitals are long vowels).  Pairs such as
# ASI/ISI/ASA/ISA share every phone and phone pair with another token, so they
# need context to tell apart.
_EASY_TOKENS: dict[str, str] = {
    "ASI": "asi",
    "ISA": "isa",
    "ASA": "asa",
    "ISI": "isi",
    "UMA": "uma",
    "AMU": "amu",
    "OTE": "ote",
    "ETO": "eto",
    "UXO": "uxo",
    "OXU": "oxu",
    "EME": "eme",
    "UTU": "utu",
}
# As many tokens, eight of them in one confusable group: ASI and ISA, each also
# with a long first or last vowel (which only the durations around it tell from
# a short one) and with "sh" for "s", and ASA and ISI.
_HARD_TOKENS: dict[str, str] = {
    **{token: _EASY_TOKENS[token] for token in ("ASI", "ISA", "ASA", "ISI")},
    "AASI": "Asi",
    "ISAA": "isA",
    "AXI": "axi",
    "IXA": "ixa",
    **{token: _EASY_TOKENS[token] for token in ("UMA", "OTE", "UXO", "EME")},
}


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker.

    Attributes:
        name: Speaker id, the prefix of its utterance ids.
        pitch_hz: Mean fundamental frequency.
        formant_scale: Factor on every formant target (vocal tract length).
        rate: Factor on every phone duration (larger is slower).
        tilt: Spectral tilt exponent of the voice source (larger is duller).
    """

    name: str
    pitch_hz: float
    formant_scale: float
    rate: float
    tilt: float


# Speaker -> (pitch_hz, formant_scale, rate, tilt) in the easy, then the hard
# variant; spk1-spk6 train, spk7 is dev and spk8 test.  Easy: dev and test lie
# inside the training range.  Hard: wider ranges (rate 0.75 to 1.35), dev at the
# low-pitch, long-tract, fast edge of the training speakers, test at the
# high-pitch, short-tract, slow edge.
_SPEAKER_ROWS: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "spk1": ((95.0, 0.89, 1.15, 1.1), (85.0, 0.86, 1.30, 1.25)),
    "spk2": ((120.0, 0.93, 0.90, 0.9), (115.0, 0.92, 0.80, 0.95)),
    "spk3": ((150.0, 1.00, 1.05, 1.0), (145.0, 0.97, 1.10, 1.10)),
    "spk4": ((190.0, 1.06, 0.85, 0.8), (185.0, 1.04, 0.75, 0.70)),
    "spk5": ((220.0, 1.10, 1.20, 0.9), (225.0, 1.10, 1.25, 0.85)),
    "spk6": ((250.0, 1.13, 0.95, 0.7), (270.0, 1.17, 0.95, 0.60)),
    "spk7": ((135.0, 0.96, 1.00, 1.0), (95.0, 0.88, 0.80, 1.20)),
    "spk8": ((205.0, 1.08, 1.10, 0.85), (255.0, 1.15, 1.30, 0.70)),
}


def _speakers(column: int) -> dict[str, tuple[Speaker, ...]]:
    """Speakers per split from one column of :data:`_SPEAKER_ROWS`."""
    speakers = [Speaker(name, *rows[column]) for name, rows in _SPEAKER_ROWS.items()]
    return {"train": tuple(speakers[:6]), "dev": (speakers[6],), "test": (speakers[7],)}


@dataclass(frozen=True)
class Variant:
    """How a demo corpus is made: vocabulary, speakers and recording conditions.

    Attributes:
        tokens: Token -> its phones.
        speakers: Speakers per split.
        snr_db: Range of each utterance's signal-to-noise ratio (uniform).
        phone_stretch: Range of each phone's random duration factor (uniform).
        utterance_rate: Range of a per-utterance factor on the speaker's rate, or
            ``None`` for none.
        noise_slope_db: Range of the background noise's spectral slope in dB per
            octave (0 is white, -6 brown), or ``None`` for white noise.
        channel: Whether each utterance passes its own random channel: high-pass
            (:data:`_HIGHPASS_HZ`), low-pass (:data:`_LOWPASS_HZ`) and spectral tilt
            (:data:`_TILT_DB`).
    """

    tokens: Mapping[str, str]
    speakers: Mapping[str, tuple[Speaker, ...]]
    snr_db: tuple[float, float]
    phone_stretch: tuple[float, float]
    utterance_rate: tuple[float, float] | None = None
    noise_slope_db: tuple[float, float] | None = None
    channel: bool = False


#: Named corpus variants (see the module docstring).
VARIANTS: dict[str, Variant] = {
    "easy": Variant(_EASY_TOKENS, _speakers(0), snr_db=(15.0, 30.0), phone_stretch=(0.85, 1.15)),
    "hard": Variant(
        _HARD_TOKENS,
        _speakers(1),
        snr_db=(10.0, 25.0),
        phone_stretch=(0.88, 1.12),
        utterance_rate=(0.9, 1.1),
        noise_slope_db=(-6.0, 0.0),
        channel=True,
    ),
}

#: The variant ``python -m stagetune.demo`` and :func:`make_demo_corpus` make.
DEFAULT_VARIANT = "hard"
#: Token -> its phones, in the default variant.
TOKENS: Mapping[str, str] = VARIANTS[DEFAULT_VARIANT].tokens
#: Speakers per split, in the default variant.
SPEAKERS: Mapping[str, tuple[Speaker, ...]] = VARIANTS[DEFAULT_VARIANT].speakers

_SPLIT_INDEX = {"train": 0, "dev": 1, "test": 2}
_BANDWIDTHS = np.array([90.0, 120.0, 180.0])
_FORMANT_GAINS = np.array([1.0, 0.6, 0.3])
_TRANSITION_S = 0.03  # formant glide between neighbouring phones
_RAMP_S = 0.008  # amplitude on/offset of a phone
_CONTROL_HZ = 1000  # rate of the formant/amplitude tracks
_ASPIRATION = 0.02
_HIGHPASS_HZ = (60.0, 200.0)  # 2nd-order corner of the hard variant's channel
_LOWPASS_HZ = (3400.0, 4000.0)  # 4th-order corner; above 3400 Hz to keep most of "s"
_TILT_DB = (-2.0, 2.0)  # per octave around 1 kHz


def synthesize_utterance(
    tokens: Sequence[str],
    speaker: Speaker,
    rng: np.random.Generator,
    sample_rate: int = 8000,
    *,
    variant: str = DEFAULT_VARIANT,
) -> np.ndarray:
    """Synthesise one utterance of ``tokens`` spoken by ``speaker``.

    Tokens are separated by 50 to 200 ms pauses, with 50 to 150 ms of silence at
    each end; background noise (at the variant's SNR, the noise's level relative
    to the speech), the variant's channel and a random gain are applied to the
    whole utterance.

    Args:
        tokens: Token names from the variant's tokens.
        speaker: Who speaks.
        rng: Source of all randomness (durations, pitch, noise, channel, gain).
        sample_rate: Output rate in Hz.
        variant: Name in :data:`VARIANTS`.

    Returns:
        1-D ``int16`` samples.
    """
    how = VARIANTS[variant]
    rate = speaker.rate
    if how.utterance_rate is not None:
        rate *= rng.uniform(*how.utterance_rate)
    pieces: list[np.ndarray] = [np.zeros(int(rng.uniform(0.05, 0.15) * sample_rate))]
    # Declination: pitch falls by about 20% over the utterance.
    start_pitch = speaker.pitch_hz * rng.uniform(1.05, 1.15)
    end_pitch = speaker.pitch_hz * rng.uniform(0.85, 0.95)
    for index, token in enumerate(tokens):
        if index:
            pieces.append(np.zeros(int(rng.uniform(0.05, 0.2) * sample_rate)))
        fraction = index / max(len(tokens) - 1, 1)
        pitch = start_pitch + (end_pitch - start_pitch) * fraction
        phones = how.tokens[token]
        pieces.append(_synthesize_token(phones, speaker, rate, pitch, how, rng, sample_rate))
    pieces.append(np.zeros(int(rng.uniform(0.05, 0.15) * sample_rate)))
    speech = np.concatenate(pieces)
    speech_rms = np.sqrt(np.mean(np.square(speech[speech != 0]))) if np.any(speech) else 1.0
    snr_db = rng.uniform(*how.snr_db)
    if how.noise_slope_db is None:
        noise = rng.standard_normal(speech.shape[0])
    else:
        slope_db = rng.uniform(*how.noise_slope_db)
        noise = _filtered(rng.standard_normal(speech.shape[0]), sample_rate, tilt_db=slope_db)
        noise /= np.sqrt(np.mean(noise**2)) + 1e-9
    signal = speech + noise * speech_rms * 10 ** (-snr_db / 20)
    if how.channel:
        signal = _filtered(
            signal,
            sample_rate,
            tilt_db=rng.uniform(*_TILT_DB),
            highpass_hz=rng.uniform(*_HIGHPASS_HZ),
            lowpass_hz=rng.uniform(*_LOWPASS_HZ),
        )
    peak = rng.uniform(0.1, 0.7) * 32767
    return to_int16(signal * (peak / np.max(np.abs(signal))))


def _filtered(
    samples: np.ndarray,
    sample_rate: int,
    *,
    tilt_db: float,
    highpass_hz: float | None = None,
    lowpass_hz: float | None = None,
) -> np.ndarray:
    """``samples`` through a zero-phase filter: a tilt of ``tilt_db`` per octave
    around 1 kHz (flat below 50 Hz), then optional 2nd-order high-pass and
    4th-order low-pass magnitude responses."""
    freqs = np.fft.rfftfreq(samples.shape[0], 1.0 / sample_rate)
    gain = (np.maximum(freqs, 50.0) / 1000.0) ** (tilt_db / (20 * np.log10(2)))
    if highpass_hz is not None:
        gain /= np.sqrt(1.0 + (highpass_hz / np.maximum(freqs, 1.0)) ** 4)
    if lowpass_hz is not None:
        gain /= np.sqrt(1.0 + (freqs / lowpass_hz) ** 8)
    return np.fft.irfft(np.fft.rfft(samples) * gain, n=samples.shape[0])


def _synthesize_token(
    phones: str,
    speaker: Speaker,
    rate: float,
    pitch_hz: float,
    how: Variant,
    rng: np.random.Generator,
    sample_rate: int,
) -> np.ndarray:
    durations = [
        _PHONES[p].duration_ms * 0.001 * rate * rng.uniform(*how.phone_stretch) for p in phones
    ]
    bounds = np.concatenate([[0.0], np.cumsum(durations)])
    total_s = bounds[-1]
    control_t = np.arange(int(total_s * _CONTROL_HZ)) / _CONTROL_HZ
    step = sample_rate // _CONTROL_HZ
    num_samples = control_t.shape[0] * step

    formant_knots: list[tuple[float, np.ndarray]] = []
    voicing_knots: list[tuple[float, float]] = [(0.0, 0.0)]
    for phone_name, start, end in zip(phones, bounds[:-1], bounds[1:]):
        phone = _PHONES[phone_name]
        if phone.formants is not None:
            targets = np.array(phone.formants) * speaker.formant_scale
            targets *= rng.uniform(0.97, 1.03, size=3)
            half = _TRANSITION_S / 2
            formant_knots += [(start + half, targets), (end - half, targets)]
        voicing_knots += [(start + _RAMP_S, phone.voicing), (end - _RAMP_S, phone.voicing)]
    voicing_knots.append((total_s, 0.0))
    knot_t = [t for t, _ in formant_knots]
    formants = np.stack(
        [np.interp(control_t, knot_t, [f[j] for _, f in formant_knots]) for j in range(3)]
    )
    voicing = np.interp(control_t, *zip(*voicing_knots))
    # A small rise-fall within the token around the declining utterance pitch.
    shape = np.sin(np.pi * control_t / total_s) * rng.uniform(-0.08, 0.12)
    pitch = pitch_hz * (1.0 + shape) * (1.0 + 0.01 * rng.standard_normal(control_t.shape[0]))

    voiced = _harmonics(pitch, formants, voicing, speaker.tilt, sample_rate)
    noise = np.zeros(num_samples)
    for phone_name, start, end in zip(phones, bounds[:-1], bounds[1:]):
        phone = _PHONES[phone_name]
        if phone.noise == 0.0:
            continue
        if phone_name == "t":  # silent closure, then a 20 ms burst
            start = end - 0.02
        first, last = int(start * sample_rate), min(int(end * sample_rate), num_samples)
        band = np.array(phone.noise_band) * min(speaker.formant_scale, 1.0)
        noise[first:last] += phone.noise * _band_noise(last - first, band, rng, sample_rate)
    # Faint aspiration wherever voiced, so vowels are not pure harmonics.
    noise += _ASPIRATION * np.repeat(voicing, step) * rng.standard_normal(num_samples)
    return voiced + noise


def _harmonics(
    pitch: np.ndarray,
    formants: np.ndarray,
    voicing: np.ndarray,
    tilt: float,
    sample_rate: int,
) -> np.ndarray:
    """Sum of pitch harmonics weighted by formant resonances (control rate -> audio rate)."""
    step = sample_rate // _CONTROL_HZ
    nyquist = sample_rate / 2
    num_harmonics = int(nyquist / pitch.min())
    k = np.arange(1, num_harmonics + 1)[:, None]
    freqs = k * pitch[None, :]  # (K, C)
    resonance = np.zeros_like(freqs)
    for j in range(3):
        offset = (freqs - formants[j][None, :]) / (_BANDWIDTHS[j] / 2)
        resonance += _FORMANT_GAINS[j] / np.sqrt(1.0 + offset**2)
    amplitude = resonance * k ** (-tilt) * voicing[None, :] * (freqs < 0.95 * nyquist)
    phase = 2 * np.pi * np.cumsum(np.repeat(pitch, step)) / sample_rate
    sample_amplitude = np.repeat(amplitude, step, axis=1)
    return np.einsum("kn,kn->n", sample_amplitude, np.sin(k * phase[None, :]))


def _band_noise(
    length: int, band: np.ndarray, rng: np.random.Generator, sample_rate: int
) -> np.ndarray:
    """Gaussian noise band-limited to ``band`` Hz with 5 ms raised-cosine edges."""
    if length <= 0:
        return np.zeros(0)
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length, 1.0 / sample_rate)
    spectrum[(freqs < band[0]) | (freqs > band[1])] = 0.0
    noise = np.fft.irfft(spectrum, n=length)
    noise /= np.sqrt(np.mean(noise**2)) + 1e-9
    ramp = min(int(0.005 * sample_rate), length // 2)
    if ramp:
        edge = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
        noise[:ramp] *= edge
        noise[length - ramp :] *= edge[::-1]
    return noise


def make_demo_corpus(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_train: int = 360,
    num_dev: int = 60,
    num_test: int = 60,
    sample_rate: int = 8000,
    num_mel_bins: int = 40,
    variant: str = DEFAULT_VARIANT,
) -> Path:
    """Write the demo corpus to ``out_dir/{train,dev,test}`` and prepare its features.

    Each utterance holds 1 to 7 tokens drawn uniformly.  Every split gets the same
    ``tokens.txt`` (``<blank> 0``, then the variant's sorted tokens), so ids agree.

    Args:
        out_dir: Output directory; existing split dirs in it are replaced.
        seed: Seed of everything; the same seed gives the same bytes.
        num_train: Training utterances (spread over six speakers).
        num_dev: Dev utterances (one held-out speaker).
        num_test: Test utterances (one held-out speaker).
        sample_rate: Audio rate in Hz; a multiple of 1000 and at least 8000.
        num_mel_bins: Feature dimension passed to :func:`stagetune.prep.prep_data_dir`.
        variant: Name in :data:`VARIANTS`.

    Returns:
        ``out_dir``.

    Raises:
        UsageError: A count is negative, train is empty, the rate is unusable or
            the variant unknown.
    """
    from stagetune.kaldi import BLANK, TokenTable
    from stagetune.prep import prep_data_dir

    counts = {"train": num_train, "dev": num_dev, "test": num_test}
    if num_train < 1 or num_dev < 0 or num_test < 0:
        raise UsageError(f"need num_train >= 1 and num_dev, num_test >= 0, got {counts}")
    if sample_rate < 8000 or sample_rate % _CONTROL_HZ:
        raise UsageError(f"sample_rate must be a multiple of 1000 and >= 8000, got {sample_rate}")
    if variant not in VARIANTS:
        raise UsageError(f"variant must be one of {', '.join(sorted(VARIANTS))}, got {variant!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; pick another OUT_DIR")
    token_table = TokenTable([BLANK, *sorted(VARIANTS[variant].tokens)])
    for split, count in counts.items():
        split_dir = out_dir / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        utterances = _utterances(split, count, seed, sample_rate, variant)
        write_wav_data_dir(split_dir, utterances, sample_rate)
        # The whole inventory, not just the tokens of this split's text, so that
        # ids agree across splits however small they are.
        token_table.write(split_dir / "tokens.txt")
        if count:
            prep_data_dir(split_dir, num_mel_bins=num_mel_bins, seed=seed)
    return out_dir


def _utterances(
    split: str, count: int, seed: int, sample_rate: int, variant: str
) -> Iterator[Utterance]:
    """The utterances of one split; each has its own generator, seeded by its index."""
    token_names = sorted(VARIANTS[variant].tokens)
    speakers = VARIANTS[variant].speakers[split]
    for index in range(count):
        rng = np.random.default_rng([seed, _SPLIT_INDEX[split], index])
        speaker = speakers[index % len(speakers)]
        tokens = [str(token) for token in rng.choice(token_names, size=int(rng.integers(1, 8)))]
        samples = synthesize_utterance(tokens, speaker, rng, sample_rate, variant=variant)
        yield Utterance(f"{speaker.name}-{split}{index:05d}", speaker.name, tokens, samples)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stagetune.demo OUT_DIR``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m stagetune.demo",
        description="Write a synthetic speech-like demo corpus with prepared features.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", type=Path)
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument(
        "--num-train", type=int, default=360, help="train utterances (default: 360)"
    )
    parser.add_argument("--num-dev", type=int, default=60, help="dev utterances (default: 60)")
    parser.add_argument("--num-test", type=int, default=60, help="test utterances (default: 60)")
    parser.add_argument("--sample-rate", type=int, default=8000, help="Hz (default: 8000)")
    parser.add_argument("--num-mel-bins", type=int, default=40, help="feature dim (default: 40)")
    parser.add_argument(
        "--variant",
        choices=sorted(VARIANTS),
        default=DEFAULT_VARIANT,
        help=f"how hard a corpus (default: {DEFAULT_VARIANT}; 'easy' is the original one)",
    )
    args = parser.parse_args(argv)
    from stagetune.errors import StagetuneError

    started = time.monotonic()
    try:
        out_dir = make_demo_corpus(
            args.out_dir,
            seed=args.seed,
            num_train=args.num_train,
            num_dev=args.num_dev,
            num_test=args.num_test,
            sample_rate=args.sample_rate,
            num_mel_bins=args.num_mel_bins,
            variant=args.variant,
        )
    except StagetuneError as exc:
        print(f"stagetune.demo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    for split in ("train", "dev", "test"):
        durations = _read_durations(out_dir / split / "utt2dur")
        print(
            f"{out_dir / split}: {len(durations)} utterances, {sum(durations):.1f} s "
            f"(mean {np.mean(durations) if durations else 0.0:.2f} s)"
        )
    print(
        f"{args.variant} variant, {len(VARIANTS[args.variant].tokens)} tokens, seed {args.seed}, "
        f"{args.num_mel_bins} mel bins, "
        f"made in {time.monotonic() - started:.1f} s"
    )
    return 0


def _read_durations(path: Path) -> list[float]:
    if not path.is_file():
        return []
    return [float(line.split()[1]) for line in path.read_text(encoding="utf-8").splitlines()]


if __name__ == "__main__":
    sys.exit(main())
