"""The default dataset: synthetic labelled audio, generated in numpy from a seed (no downloads).

Twelve classes of clearly different acoustic events (tones at class-specific pitch ranges, rising and
falling chirps, amplitude- and frequency-modulated tones, coloured noise bursts, click trains at
class-specific rates, harmonic stacks) are placed at random onsets, durations and levels over coloured
background noise at a random SNR, in clips whose duration is drawn per clip.

Every clip depends only on (config, index): workers can generate any clip independently and in any order.
A single-label clip holds one event; its class is balanced over each block of `len(CLASS_NAMES)`
consecutive indices. A multi-label clip mixes 1..max_events events of distinct classes. `make_clip_events`
also returns each event's onset, offset and class (the truth of sound event detection).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.fft

CLASS_NAMES: tuple[str, ...] = (
    "low_tone",
    "high_tone",
    "rising_chirp",
    "falling_chirp",
    "am_tone",
    "vibrato_tone",
    "noise_band",
    "pink_noise",
    "brown_noise",
    "slow_clicks",
    "fast_clicks",
    "harmonic_stack",
)

# Per-class parameter ranges (uniform draws unless noted). Frequencies in Hz, rates in Hz, times in s.
EVENT_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "low_tone": {"freq": (100.0, 350.0)},
    "high_tone": {"freq": (3000.0, 6000.0)},
    "rising_chirp": {"start": (250.0, 600.0), "stop": (2500.0, 6000.0)},  # log-frequency sweep
    "falling_chirp": {"start": (2500.0, 6000.0), "stop": (250.0, 600.0)},
    "am_tone": {"freq": (500.0, 1200.0), "rate": (4.0, 12.0), "depth": (0.8, 1.0)},
    "vibrato_tone": {"freq": (1200.0, 2500.0), "rate": (4.0, 8.0), "depth": (0.03, 0.08)},  # depth: of freq
    "noise_band": {"center": (1000.0, 4000.0), "octaves": (1.0, 2.0)},  # band-passed white noise
    "pink_noise": {"exponent": (0.9, 1.1)},  # power spectrum ~ 1 / f**exponent
    "brown_noise": {"exponent": (1.9, 2.1)},
    "slow_clicks": {"rate": (3.0, 8.0), "freq": (2000.0, 5000.0), "decay": (0.001, 0.003)},
    "fast_clicks": {"rate": (25.0, 60.0), "freq": (2000.0, 5000.0), "decay": (0.001, 0.003)},
    "harmonic_stack": {"f0": (100.0, 300.0), "harmonics": (5.0, 15.0), "rolloff": (0.5, 1.5)},
}

_LOWEST_NOISE_HZ = 20.0  # coloured noise is shaped above this frequency (no DC / sub-audio drift)
_CLICK_DECAY_LENGTHS = 6.0  # a click's kernel spans this many decay time constants
_CLICK_JITTER = 0.1  # click times jitter by this fraction of the click period
_MIN_SAMPLE_RATE = 16000  # the class frequency ranges reach 7 kHz


@dataclass(frozen=True)
class SyntheticConfig:
    """How many clips, from which seed, of which shape.

    snr_db: per-event signal-to-noise ratio range (event RMS over its span vs background RMS).
    event_seconds: event duration range (clipped to the clip's duration).
    ramp_seconds: raised-cosine fade-in/out range of each event.
    peak_db: range of the clip's peak level after normalisation (dB re full scale; headroom < 0).
    background_exponent: range of the background noise colour (0 white, 1 pink).
    """

    num_clips: int = 200
    seed: int = 0
    multilabel: bool = False
    min_seconds: float = 1.0
    max_seconds: float = 10.0
    sample_rate: int = 16000
    max_events: int = 3
    snr_db: tuple[float, float] = (6.0, 30.0)  # below ~5 dB broadband events vanish in the background
    event_seconds: tuple[float, float] = (0.5, 4.0)
    ramp_seconds: tuple[float, float] = (0.005, 0.05)
    peak_db: tuple[float, float] = (-12.0, -1.0)
    background_exponent: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self):
        where = "SyntheticConfig (bat_jax/audio/synthetic.py)"
        if self.num_clips < 0:
            raise ValueError(f"{where}: expected num_clips >= 0, found {self.num_clips}")
        if self.seed < 0:
            raise ValueError(f"{where}: expected seed >= 0, found {self.seed}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise ValueError(
                f"{where}: expected 0 < min_seconds <= max_seconds, "
                f"found {self.min_seconds} and {self.max_seconds}"
            )
        if self.sample_rate < _MIN_SAMPLE_RATE:
            raise ValueError(
                f"{where}: expected sample_rate >= {_MIN_SAMPLE_RATE} (events reach 7 kHz), "
                f"found {self.sample_rate}"
            )
        if not 1 <= self.max_events <= len(CLASS_NAMES):
            raise ValueError(
                f"{where}: expected 1 <= max_events <= {len(CLASS_NAMES)}, found {self.max_events}"
            )
        for name in ("snr_db", "event_seconds", "ramp_seconds", "peak_db", "background_exponent"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(
                    f"{where}: expected {name} as (low, high) with low <= high, found {lo}, {hi}"
                )
        if self.event_seconds[0] <= 0 or self.peak_db[1] > 0:
            raise ValueError(
                f"{where}: expected event_seconds > 0 and peak_db <= 0, "
                f"found {self.event_seconds} and {self.peak_db}"
            )


def clip_id(index: int, config: SyntheticConfig) -> str:
    """A stable, sortable id, e.g. "synth-ml-s0-000123" (multi-label) or "synth-sl-s0-000123"."""
    kind = "ml" if config.multilabel else "sl"
    return f"synth-{kind}-s{config.seed}-{index:06d}"


def make_clip(index: int, config: SyntheticConfig) -> tuple[np.ndarray, tuple[int, ...]]:
    """float32 [samples] mono waveform in [-1, 1] and its sorted class indices, for clip `index`."""
    wave, labels, _ = make_clip_events(index, config)
    return wave, labels


def make_clip_events(
    index: int, config: SyntheticConfig
) -> tuple[np.ndarray, tuple[int, ...], tuple[tuple[float, float, int], ...]]:
    """`make_clip(index, config)` and the clip's true sound events: (onset s, offset s, class) of every event,
    sorted, in seconds from the clip's start (onset, onset + length samples / sample_rate; the event's fades
    lie inside it). Seconds do not change when the clip is resampled."""
    if index < 0:
        raise ValueError(f"make_clip (bat_jax/audio/synthetic.py): expected index >= 0, found {index}")
    sr = config.sample_rate
    rng = np.random.default_rng([config.seed, int(config.multilabel), index])
    n = _clip_samples(rng, config)
    classes = _clip_classes(rng, index, config)
    wave = _coloured_noise(rng, n, sr, _uniform(rng, config.background_exponent))  # [n] background, RMS 1
    events = []
    for c in classes:
        max_len = max(1, min(n, round(config.event_seconds[1] * sr)))
        min_len = min(max_len, max(1, round(config.event_seconds[0] * sr)))
        length = int(rng.integers(min_len, max_len + 1))
        onset = int(rng.integers(0, n - length + 1))
        event = _EVENTS[CLASS_NAMES[c]](rng, length, sr, EVENT_PARAMS[CLASS_NAMES[c]])
        event = _unit_rms(event) * _ramp_envelope(rng, length, sr, config.ramp_seconds)
        gain = 10.0 ** (_uniform(rng, config.snr_db) / 20.0)  # background RMS is 1
        wave[onset : onset + length] += gain * event
        events.append((onset / sr, (onset + length) / sr, int(c)))
    peak = 10.0 ** (_uniform(rng, config.peak_db) / 20.0)
    wave = wave * (peak / max(np.max(np.abs(wave)), 1e-12))
    return wave.astype(np.float32), tuple(sorted(int(c) for c in classes)), tuple(sorted(events))


def iter_clips(
    config: SyntheticConfig, indices: Iterable[int] | None = None
) -> Iterator[tuple[str, np.ndarray, tuple[int, ...]]]:
    """Yield (clip_id, float32 wave, labels) for indices 0..num_clips-1 (or the given indices)."""
    for i in range(config.num_clips) if indices is None else indices:
        wave, labels = make_clip(i, config)
        yield clip_id(i, config), wave, labels


def write_folder(path: str | Path, config: SyntheticConfig) -> Path:
    """Write the clips as 16-bit `<clip_id>.wav` files plus `labels.csv` (path,labels; `;`-joined names).

    Returns the path of labels.csv.
    """
    import soundfile as sf

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for cid, wave, labels in iter_clips(config):
        name = f"{cid}.wav"
        sf.write(folder / name, wave, config.sample_rate, subtype="PCM_16")
        rows.append((name, ";".join(CLASS_NAMES[c] for c in labels)))
    csv_path = folder / "labels.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "labels"))
        writer.writerows(rows)
    return csv_path


# --- clip layout -------------------------------------------------------------------------------------


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def _clip_samples(rng: np.random.Generator, config: SyntheticConfig) -> int:
    sr = config.sample_rate
    lo = int(np.ceil(config.min_seconds * sr))
    hi = max(lo, int(np.floor(config.max_seconds * sr)))
    return int(rng.integers(lo, hi + 1))


def _clip_classes(rng: np.random.Generator, index: int, config: SyntheticConfig) -> list[int]:
    """The clip's distinct classes; the first one is balanced over blocks of len(CLASS_NAMES) indices."""
    num_classes = len(CLASS_NAMES)
    block, slot = divmod(index, num_classes)
    block_rng = np.random.default_rng([config.seed, int(config.multilabel), block, num_classes])
    first = int(block_rng.permutation(num_classes)[slot])
    if not config.multilabel:
        return [first]
    count = int(rng.integers(1, config.max_events + 1))
    others = [c for c in range(num_classes) if c != first]
    return [first] + [int(c) for c in rng.choice(others, size=count - 1, replace=False)]


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / max(float(np.sqrt(np.mean(x**2))), 1e-12)


def _ramp_envelope(
    rng: np.random.Generator, n: int, sr: int, ramp_seconds: tuple[float, float]
) -> np.ndarray:
    """[n] raised-cosine fade-in and fade-out, each at most half the event."""
    ramp = min(n // 2, round(_uniform(rng, ramp_seconds) * sr))
    env = np.ones(n)
    if ramp > 0:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        env[:ramp] = rise
        env[n - ramp :] = rise[::-1]
    return env


# --- event generators: (rng, samples, sample_rate, params) -> float64 [samples] ----------------------


def _coloured_noise(
    rng: np.random.Generator, n: int, sr: int, exponent: float, band: tuple[float, float] | None = None
) -> np.ndarray:
    """Unit-RMS Gaussian noise with power spectrum ~ 1/f**exponent, optionally band-limited to `band`.

    Shaped over an FFT-friendly length >= n (scipy's next_fast_len for real FFTs: the smallest 5-smooth
    number, 2**a * 3**b * 5**c; prime sizes are many times slower), then cut to n samples.
    """
    m = scipy.fft.next_fast_len(n, real=True)
    spectrum = np.fft.rfft(rng.standard_normal(m))  # [m//2 + 1]
    freqs = np.fft.rfftfreq(m, d=1.0 / sr)
    shape = np.maximum(freqs, _LOWEST_NOISE_HZ) ** (-exponent / 2.0)
    shape[freqs < _LOWEST_NOISE_HZ] = 0.0
    if band is not None:
        shape[(freqs < band[0]) | (freqs > band[1])] = 0.0
    return _unit_rms(np.fft.irfft(spectrum * shape, n=m)[:n])


def _tone(rng, n, sr, p):
    t = np.arange(n) / sr
    return np.sin(2 * np.pi * _uniform(rng, p["freq"]) * t + rng.uniform(0, 2 * np.pi))


def _chirp(rng, n, sr, p):
    f0, f1 = _uniform(rng, p["start"]), _uniform(rng, p["stop"])
    duration = n / sr
    t = np.arange(n) / sr
    k = np.log(f1 / f0) / duration  # instantaneous frequency f0 * exp(k t)
    return np.sin(2 * np.pi * f0 * np.expm1(k * t) / k)


def _am_tone(rng, n, sr, p):
    t = np.arange(n) / sr
    carrier = np.sin(2 * np.pi * _uniform(rng, p["freq"]) * t)
    depth = _uniform(rng, p["depth"])
    modulator = 1.0 - depth * 0.5 * (1.0 + np.cos(2 * np.pi * _uniform(rng, p["rate"]) * t))
    return carrier * modulator


def _vibrato_tone(rng, n, sr, p):
    t = np.arange(n) / sr
    freq, rate = _uniform(rng, p["freq"]), _uniform(rng, p["rate"])
    deviation = freq * _uniform(rng, p["depth"])  # Hz
    phase = 2 * np.pi * freq * t + (deviation / rate) * np.sin(2 * np.pi * rate * t)
    return np.sin(phase)


def _noise_band(rng, n, sr, p):
    center, octaves = _uniform(rng, p["center"]), _uniform(rng, p["octaves"])
    half = 2.0 ** (octaves / 2.0)
    return _coloured_noise(rng, n, sr, 0.0, band=(center / half, center * half))


def _power_noise(rng, n, sr, p):
    return _coloured_noise(rng, n, sr, _uniform(rng, p["exponent"]))


def _clicks(rng, n, sr, p):
    """Decaying-sinusoid clicks at a jittered constant rate, starting within the first period."""
    period = sr / _uniform(rng, p["rate"])  # samples
    times = np.arange(rng.uniform(0, period), n, period)
    times = times + rng.uniform(-_CLICK_JITTER, _CLICK_JITTER, size=times.shape) * period
    impulses = np.zeros(n)
    impulses[np.clip(np.round(times).astype(np.int64), 0, n - 1)] = 1.0
    decay = _uniform(rng, p["decay"])
    tk = np.arange(max(1, round(_CLICK_DECAY_LENGTHS * decay * sr))) / sr
    kernel = np.exp(-tk / decay) * np.sin(2 * np.pi * _uniform(rng, p["freq"]) * tk)
    return np.convolve(impulses, kernel)[:n]


def _harmonic_stack(rng, n, sr, p):
    f0 = _uniform(rng, p["f0"])
    count = min(int(rng.integers(p["harmonics"][0], p["harmonics"][1] + 1)), int(0.45 * sr / f0))
    k = np.arange(1, count + 1)[:, None]  # [K, 1]
    amplitudes = k ** (-_uniform(rng, p["rolloff"]))  # [K, 1]
    phases = rng.uniform(0, 2 * np.pi, size=(count, 1))
    t = np.arange(n)[None, :] / sr  # [1, n]
    return np.sum(amplitudes * np.sin(2 * np.pi * f0 * k * t + phases), axis=0)


_EVENTS: dict[str, Callable[..., np.ndarray]] = {
    "low_tone": _tone,
    "high_tone": _tone,
    "rising_chirp": _chirp,
    "falling_chirp": _chirp,
    "am_tone": _am_tone,
    "vibrato_tone": _vibrato_tone,
    "noise_band": _noise_band,
    "pink_noise": _power_noise,
    "brown_noise": _power_noise,
    "slow_clicks": _clicks,
    "fast_clicks": _clicks,
    "harmonic_stack": _harmonic_stack,
}
