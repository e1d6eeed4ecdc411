"""bat_jax.audio: front-end parity with the PyTorch reference (tests/golden/frontend.npz), batching, edge cases,
and file loading."""

import jax
import librosa
import numpy as np
import pytest
import soundfile as sf

from bat_jax.audio import kaldi_fbank, load, logmel, normalize_fbank
from bat_jax.audio.frontend import FBANK_STATS, htk_mel_filterbank
from bat_jax.audio.io import AudioLoadError

LOGMEL_TOL = 1e-3  # on the [0, 1] scale (fixed by the issue)
KALDI_TOL = 1e-2  # on the natural-log scale (fixed by the issue)
SR = 16000


@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "frontend.npz") as npz:
        return dict(npz)


def _clip_ids(golden):
    return sorted(int(key.removeprefix("wave_")) for key in golden if key.startswith("wave_"))


def test_golden_file_has_three_clips(golden):
    assert _clip_ids(golden) == [0, 1, 2]


@pytest.mark.parametrize("i", [0, 1, 2])
def test_logmel_matches_reference(golden, i):
    expected = golden[f"bat_logmel_{i}"]
    got = np.asarray(logmel(golden[f"wave_{i}"]))
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= LOGMEL_TOL


@pytest.mark.parametrize("i", [0, 1, 2])
def test_kaldi_fbank_matches_reference(golden, i):
    expected = golden[f"kaldi_fbank_{i}"]
    got = np.asarray(kaldi_fbank(golden[f"wave_{i}"]))
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= KALDI_TOL


def test_mel_filterbank_matches_librosa_htk_without_norm():
    ours = htk_mel_filterbank(513, 0.0, 8000.0, 128, SR)  # [freqs, mels]
    theirs = librosa.filters.mel(sr=SR, n_fft=1024, n_mels=128, fmin=0.0, fmax=8000.0, htk=True, norm=None)
    np.testing.assert_allclose(ours, theirs.T, atol=1e-6)


@pytest.fixture(scope="module")
def equal_clips(golden):
    """Three 1 s clips cut from the long golden waveform: [3, 16000]."""
    wave = golden["wave_2"]
    return np.stack([wave[start : start + SR] for start in (0, 50_000, 120_000)])


@pytest.mark.parametrize("frontend", [logmel, kaldi_fbank], ids=["logmel", "kaldi_fbank"])
def test_batch_equals_clips_one_by_one(equal_clips, frontend):
    one_by_one = np.stack([np.asarray(frontend(clip)) for clip in equal_clips])
    batched = np.asarray(jax.jit(frontend)(equal_clips))
    assert batched.shape == one_by_one.shape
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    nested = np.asarray(frontend(np.stack([equal_clips, equal_clips[::-1]])))  # [2, 3, samples]
    np.testing.assert_allclose(nested[0], one_by_one, atol=1e-5)
    np.testing.assert_allclose(nested[1], one_by_one[::-1], atol=1e-5)


def test_short_clip():
    wave = np.random.default_rng(0).standard_normal(3200).astype(np.float32) * 0.1  # 0.2 s
    spec = np.asarray(logmel(wave))
    assert spec.shape == (3200 // 160 + 1, 128)
    assert np.isfinite(spec).all() and spec.min() == 0.0 and spec.max() > 0.99
    fbank = np.asarray(kaldi_fbank(wave))
    assert fbank.shape == (1 + (3200 - 400) // 160, 128)
    assert np.isfinite(fbank).all()


def test_silent_clip_is_finite():
    silence = np.zeros(SR, np.float32)
    spec = np.asarray(logmel(silence))
    assert np.isfinite(spec).all()
    np.testing.assert_array_equal(spec, 0.0)
    fbank = np.asarray(kaldi_fbank(silence))
    assert np.isfinite(fbank).all()
    np.testing.assert_allclose(fbank, np.log(np.finfo(np.float32).eps))


def test_too_short_waveforms_are_rejected():
    with pytest.raises(ValueError, match="at least one frame of 400 samples"):
        kaldi_fbank(np.zeros(399, np.float32))
    with pytest.raises(ValueError, match="more than n_fft // 2 = 512 samples"):
        logmel(np.zeros(512, np.float32))


def test_normalize_fbank():
    mean, std = FBANK_STATS["audioset"]
    assert (mean, std) == (-4.268, 4.569)
    fbank = np.array([[mean, mean + 2 * std]], np.float32)
    np.testing.assert_allclose(np.asarray(normalize_fbank(fbank, mean, std)), [[0.0, 1.0]], atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# load()


def _tone(rate: int, seconds: float, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.sin(2 * np.pi * hz * t)


def _peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def test_load_int16_stereo_44k_wav(tmp_path):
    rate, tone = 44100, _tone(44100, 0.5)
    stereo = np.stack([0.5 * tone, 0.25 * tone], axis=1)  # [samples, 2]
    path = tmp_path / "stereo.wav"
    sf.write(path, (stereo * 32767).astype(np.int16), rate, subtype="PCM_16")
    wave = load(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - round(len(tone) * SR / rate)) <= 1
    assert abs(_peak_hz(wave, SR) - 1000.0) <= SR / len(wave)
    assert np.abs(wave).max() == pytest.approx(0.375, abs=0.01)  # mean of the channels, scaled to [-1, 1]
    reference, _ = librosa.load(path, sr=SR, res_type="soxr_hq")  # what the PyTorch reference loads
    np.testing.assert_allclose(wave, reference, atol=1e-6)


def test_load_float_flac(tmp_path):
    rate, tone = 22050, 0.8 * _tone(22050, 0.5)
    path = tmp_path / "tone.flac"
    sf.write(path, tone.astype(np.float32), rate, subtype="PCM_24")
    wave = load(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - round(len(tone) * SR / rate)) <= 1
    assert abs(_peak_hz(wave, SR) - 1000.0) <= SR / len(wave)
    same_rate = load(path, sample_rate=rate)
    np.testing.assert_allclose(same_rate, tone, atol=1e-6)


def test_load_ogg_vorbis(tmp_path):
    rate, tone = 44100, 0.5 * _tone(44100, 0.5)
    path = tmp_path / "tone.ogg"
    sf.write(path, tone.astype(np.float32), rate, format="OGG", subtype="VORBIS")
    wave = load(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(_peak_hz(wave, SR) - 1000.0) <= SR / len(wave)


def test_load_rejects_non_audio(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_bytes(b"this is plain text, not audio\n" * 10)
    with pytest.raises(AudioLoadError, match="notes.wav"):
        load(path)


def test_load_rejects_empty_wav(tmp_path):
    path = tmp_path / "empty.wav"
    sf.write(path, np.zeros((0,), np.int16), SR, subtype="PCM_16")
    with pytest.raises(AudioLoadError, match=r"empty\.wav.*empty file"):
        load(path)


def test_load_rejects_missing_file(tmp_path):
    with pytest.raises(AudioLoadError, match="missing.wav"):
        load(tmp_path / "missing.wav")
    assert issubclass(AudioLoadError, ValueError)
