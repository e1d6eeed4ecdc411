"""Spectrogram front-ends in jax.numpy: BAT's log-mel and the legacy Kaldi fbank (EAT/SSLAM).

Both take waveforms [..., samples] (numpy or jax, any leading batch dims), are jitted with their
parameters static, and return [..., frames, n_mels] float32. Filterbanks and windows are built in numpy
once per parameter set and cached; the per-clip work is one gather (framing), one rfft and one matmul.
"""

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Dataset statistics (mean, std) of the legacy Kaldi fbank, for `normalize_fbank`.
# The EAT repository's own AudioSet pair is -4.268 / 4.569 (used by its released checkpoints);
# PAPER.md lists -4.5986 / 4.3574 ("audioset_paper") for BAT's legacy loader. The others are BAT's legacy
# loader's per-dataset statistics.
FBANK_STATS: dict[str, tuple[float, float]] = {
    "audioset": (-4.268, 4.569),
    "audioset_paper": (-4.59864076, 4.357353477),
    "speech_commands": (-9.03415996, 4.57304508),
    "esc50": (-6.85408831, 5.39770323),
    "librispeech": (-7.32925959, 4.06100490),
    "birdset": (-8.55048120, 4.04533479),
    "dcase": (-10.68592022, 2.06164972),
}

_POWER_FLOOR = 1e-10  # AmplitudeToDB's amin: dB = 10 log10(max(power, amin))
_MATMUL_PRECISION = jax.lax.Precision.HIGHEST  # keep the mel matmul in float32 on GPU/TPU too


# ---------------------------------------------------------------------------------------------------------
# Filterbanks and windows (numpy, cached per parameter set)


def _readonly(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


@functools.cache
def htk_mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> np.ndarray:
    """Triangular HTK mel filters without area normalisation (torchaudio `melscale_fbanks`, norm=None).

    librosa.filters.mel(htk=True, norm=None) on n_fft = 2 (n_freqs - 1). Returns [n_freqs, n_mels] float64:
    the weight of each linear FFT bin in each mel band.
    """
    import librosa

    bank = librosa.filters.mel(
        sr=sample_rate,
        n_fft=2 * (n_freqs - 1),
        n_mels=n_mels,
        fmin=f_min,
        fmax=f_max,
        htk=True,
        norm=None,
        dtype=np.float64,
    )  # [n_mels, n_freqs]
    return _readonly(np.ascontiguousarray(bank.T))  # [n_freqs, n_mels]


def _kaldi_mel(hz: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + hz / 700.0)


@functools.cache
def kaldi_mel_filterbank(
    num_bins: int, padded_window: int, sample_rate: float, low_freq: float, high_freq: float
) -> np.ndarray:
    """Kaldi's mel banks (triangles in mel space), as torchaudio.compliance.kaldi builds them.

    Covers FFT bins 0 .. padded_window/2 - 1; the Nyquist bin gets a zero row, so the result is
    [padded_window // 2 + 1, num_bins] float64 and multiplies a full rfft power spectrum.
    """
    nyquist = 0.5 * sample_rate
    high = high_freq if high_freq > 0.0 else high_freq + nyquist
    if not 0.0 <= low_freq < high <= nyquist:
        raise ValueError(
            f"kaldi_fbank expects 0 <= low_freq < high_freq <= Nyquist ({nyquist} Hz), "
            f"found low_freq={low_freq}, high_freq={high} (given {high_freq})"
        )
    num_fft_bins = padded_window // 2
    mel_low, mel_high = _kaldi_mel(np.float64(low_freq)), _kaldi_mel(np.float64(high))
    delta = (mel_high - mel_low) / (num_bins + 1)
    band = np.arange(num_bins, dtype=np.float64)[None, :]  # [1, num_bins]
    left, centre, right = mel_low + band * delta, mel_low + (band + 1) * delta, mel_low + (band + 2) * delta
    bin_mel = _kaldi_mel(np.arange(num_fft_bins) * (sample_rate / padded_window))[:, None]  # [bins, 1]
    rising = (bin_mel - left) / (centre - left)
    falling = (right - bin_mel) / (right - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))  # [num_fft_bins, num_bins]
    return _readonly(np.concatenate([weights, np.zeros((1, num_bins))], axis=0))  # Nyquist bin: zero row


@functools.cache
def _hann(length: int, periodic: bool) -> np.ndarray:
    """Hann window; periodic (torch.hann_window default) or symmetric (Kaldi's 'hanning')."""
    denominator = length if periodic else length - 1
    return _readonly(0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(length) / denominator))  # float64


@functools.cache
def _frame_index(num_frames: int, frame_length: int, hop: int) -> np.ndarray:
    """Sample index of every frame: [num_frames, frame_length] int32."""
    index = np.arange(num_frames)[:, None] * hop + np.arange(frame_length)[None, :]
    return _readonly(index.astype(np.int32))


def _frames(wave: jax.Array, frame_length: int, hop: int) -> jax.Array:
    """[..., samples] -> [..., frames, frame_length], frames = 1 + (samples - frame_length) // hop."""
    num_frames = 1 + (wave.shape[-1] - frame_length) // hop
    return wave[..., _frame_index(num_frames, frame_length, hop)]


def _as_float32(wave) -> jax.Array:
    wave = jnp.asarray(wave)
    if not jnp.issubdtype(wave.dtype, jnp.floating):
        raise TypeError(
            f"front-ends expect a floating-point waveform [..., samples], found dtype {wave.dtype}"
        )
    return wave.astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------
# BAT front-end


@functools.partial(
    jax.jit,
    static_argnames=("sample_rate", "n_fft", "hop_length", "n_mels", "f_min", "f_max", "top_db", "eps"),
)
def logmel(
    wave,
    *,
    sample_rate: int = 16000,
    n_fft: int = 1024,
    hop_length: int = 160,
    n_mels: int = 128,
    f_min: float = 0.0,
    f_max: float | None = None,
    top_db: float = 80.0,
    eps: float = 1e-8,
    num_valid_frames=None,
) -> jax.Array:
    """BAT front-end: per-clip min-max normalised dB mel spectrogram in [0, 1].

    Centred frames (reflect padding of n_fft // 2), periodic Hann window, power spectrum, HTK mel filters
    without normalisation, dB floored at (clip max - top_db), then (x - min) / (max - min + eps) over each
    clip's whole [frames, mels].

    num_valid_frames: None, or int [...] (a traced value is fine: one compilation for any count): only the
    first T frames of each clip are its own (the waveform was padded after it); the dB floor and min-max
    run over those T frames and the frames from T on are 0. With the clip's samples followed by n_fft // 2
    samples of its reflection, frames [:T] equal `logmel` of the unpadded clip, T = samples // hop + 1.

    wave: [..., samples] -> [..., samples // hop_length + 1, n_mels] float32.
    """
    wave = _as_float32(wave)
    pad = n_fft // 2
    if wave.shape[-1] <= pad:
        raise ValueError(
            f"logmel expects more than n_fft // 2 = {pad} samples for reflect padding, "
            f"found a waveform of shape {wave.shape}"
        )
    f_max = sample_rate / 2 if f_max is None else f_max
    padded = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(pad, pad)], mode="reflect")
    window = jnp.asarray(_hann(n_fft, periodic=True), jnp.float32)
    frames = _frames(padded, n_fft, hop_length) * window  # [..., T, n_fft]
    spectrum = jnp.fft.rfft(frames, axis=-1)  # [..., T, n_fft // 2 + 1]
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    mel_fb = htk_mel_filterbank(n_fft // 2 + 1, float(f_min), float(f_max), n_mels, sample_rate)
    mel = jnp.matmul(power, jnp.asarray(mel_fb, jnp.float32), precision=_MATMUL_PRECISION)  # [..., T, n_mels]
    db = 10.0 * jnp.log10(jnp.maximum(mel, _POWER_FLOOR))
    if num_valid_frames is None:
        db = jnp.maximum(db, db.max(axis=(-2, -1), keepdims=True) - top_db)
        low = db.min(axis=(-2, -1), keepdims=True)
        high = db.max(axis=(-2, -1), keepdims=True)
        return (db - low) / (high - low + eps)
    valid = _valid_frames(db.shape[-2], num_valid_frames)  # [..., T, 1]
    high = jnp.max(jnp.where(valid, db, -jnp.inf), axis=(-2, -1), keepdims=True)
    db = jnp.maximum(db, high - top_db)
    low = jnp.min(jnp.where(valid, db, jnp.inf), axis=(-2, -1), keepdims=True)
    return jnp.where(valid, (db - low) / (high - low + eps), 0.0)


def _valid_frames(num_frames: int, num_valid_frames) -> jax.Array:
    """bool [..., num_frames, 1]: frame t < num_valid_frames[...]."""
    count = jnp.asarray(num_valid_frames, jnp.int32)[..., None, None]  # [..., 1, 1]
    return jnp.arange(num_frames)[:, None] < count


# ---------------------------------------------------------------------------------------------------------
# Legacy Kaldi front-end (EAT / SSLAM)


def _use_float64(float64: bool | None) -> bool:
    return jax.default_backend() != "tpu" if float64 is None else float64


@functools.partial(
    jax.jit,
    static_argnames=(
        "sample_rate",
        "num_mel_bins",
        "frame_length_ms",
        "frame_shift_ms",
        "preemphasis",
        "low_freq",
        "high_freq",
        "remove_mean",
        "float64",
    ),
)
def kaldi_fbank(
    wave,
    *,
    sample_rate: int = 16000,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    preemphasis: float = 0.97,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    remove_mean: bool = True,
    float64: bool | None = None,
) -> jax.Array:
    """Legacy EAT/SSLAM front-end: Kaldi log-mel fbank (torchaudio.compliance.kaldi.fbank compatible).

    Settings fixed as EAT uses them: htk_compat, 'hanning' window, no dither, no energy, snip_edges,
    per-frame DC removal, FFT size rounded up to a power of two, power spectrum, natural log floored at
    float32 eps. With remove_mean the waveform's mean (over its last axis, so padding counts) is removed
    first. high_freq <= 0 means Nyquist + high_freq. Returns the raw log-mel; dataset normalisation is
    `normalize_fbank`.

    float64: compute in float64 (a local `jax.enable_x64`; the result is float32). The log of the quietest
    mel bins (power ~1e-7 next to frame energies ~10) is dominated by float32 FFT rounding, about 1e-2
    apart between two float32 FFT libraries; float64 stays within ~8e-3 of torchaudio there. None (default):
    float64 except on TPU, where float64 is not native and float32 is used.

    wave: [..., samples] -> [..., 1 + (samples - frame) // shift, num_mel_bins] float32.
    """
    wave = _as_float32(wave)
    frame_length = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    if wave.shape[-1] < frame_length:
        raise ValueError(
            f"kaldi_fbank expects at least one frame of {frame_length} samples, "
            f"found a waveform of shape {wave.shape}"
        )
    padded_window = 1 << math.ceil(math.log2(frame_length))
    mel_fb = kaldi_mel_filterbank(num_mel_bins, padded_window, float(sample_rate), low_freq, high_freq)
    use_float64 = _use_float64(float64)
    dtype = jnp.float64 if use_float64 else jnp.float32
    with jax.enable_x64(True) if use_float64 else contextlib.nullcontext():
        wave = wave.astype(dtype)
        if remove_mean:
            wave = wave - wave.mean(axis=-1, keepdims=True)
        frames = _frames(wave, frame_length, shift)  # [..., T, frame_length]
        frames = frames - frames.mean(axis=-1, keepdims=True)
        previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)  # x[-1] := x[0]
        frames = (frames - preemphasis * previous) * jnp.asarray(_hann(frame_length, periodic=False), dtype)
        spectrum = jnp.fft.rfft(frames, n=padded_window, axis=-1)  # zero-padded: [..., T, padded // 2 + 1]
        power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
        mel = jnp.matmul(power, jnp.asarray(mel_fb, dtype), precision=_MATMUL_PRECISION)  # [..., T, bins]
        log_mel = jnp.log(jnp.maximum(mel, np.finfo(np.float32).eps))
        return log_mel.astype(jnp.float32)


def normalize_fbank(fbank, mean: float, std: float) -> jax.Array:
    """Dataset normalisation of a Kaldi fbank, as EAT does it: (x - mean) / (2 std). See FBANK_STATS."""
    return (jnp.asarray(fbank) - mean) / (2.0 * std)
