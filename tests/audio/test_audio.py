"""bat_jax.audio: front-end parity with the PyTorch reference (tests/golden/frontend.npz), batching, edge
cases, and file loading."""

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


def _htk_triangles(n_freqs, f_min, f_max, n_mels, rate):
    """The HTK mel triangles written out (torchaudio melscale_fbanks, norm=None): [n_freqs, n_mels]."""
    to_mel = lambda hz: 2595.0 * np.log10(1.0 + hz / 700.0)
    to_hz = lambda mel: 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    freqs = np.linspace(0.0, rate // 2, n_freqs)
    edges = to_hz(np.linspace(to_mel(f_min), to_mel(f_max), n_mels + 2))
    offsets = edges[None, :] - freqs[:, None]
    rising = -offsets[:, :-2] / np.diff(edges)[:-1]
    falling = offsets[:, 2:] / np.diff(edges)[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


@pytest.mark.parametrize("n_fft,f_min,f_max,n_mels", [(1024, 0.0, 8000.0, 128), (400, 50.0, 7600.0, 64)])
def test_mel_filterbank_is_the_htk_triangles_without_norm(n_fft, f_min, f_max, n_mels):
    ours = htk_mel_filterbank(n_fft // 2 + 1, f_min, f_max, n_mels, SR)  # [freqs, mels]
    assert ours.shape == (n_fft // 2 + 1, n_mels)
    np.testing.assert_allclose(ours, _htk_triangles(n_fft // 2 + 1, f_min, f_max, n_mels, SR), atol=1e-6)


def _padded_after(wave: np.ndarray, total: int, loud: bool = False) -> np.ndarray:
    """The clip, n_fft // 2 samples of its end reflected, then zeros (or loud noise): [total]."""
    tail = np.pad(wave, (0, 512), mode="reflect")
    fill = np.random.default_rng(0).uniform(-30, 30, total - tail.shape[0]) if loud else 0.0
    return np.concatenate([tail, np.zeros(total - tail.shape[0]) + fill]).astype(np.float32)


@pytest.mark.parametrize("samples", [513, 4000, 16000, 23456])
def test_num_valid_frames_equals_logmel_of_the_unpadded_clip(golden, samples):
    wave = golden["wave_2"][50_000 : 50_000 + samples]
    frames = samples // 160 + 1
    expected = np.asarray(logmel(wave))  # [frames, 128]
    got = np.asarray(logmel(_padded_after(wave, 30_000), num_valid_frames=frames))  # [188, 128]
    assert got.shape == (30_000 // 160 + 1, 128)
    np.testing.assert_allclose(got[:frames], expected, atol=1e-5)
    assert not got[frames:].any()
    # whatever follows the clip's reflected end is ignored; without the option it moves the min-max
    loud = _padded_after(wave, 30_000, loud=True)
    np.testing.assert_allclose(
        np.asarray(logmel(loud, num_valid_frames=frames))[:frames], expected, atol=1e-5
    )
    assert np.abs(np.asarray(logmel(loud))[:frames] - expected).max() > 1e-2


def test_num_valid_frames_is_traced_and_per_clip(golden):
    traces = []

    @jax.jit
    def bucketed(wave, count):
        traces.append(1)
        return logmel(wave, num_valid_frames=count)

    waves = [golden["wave_2"][50_000 : 50_000 + n] for n in (8000, 12000)]
    padded = np.stack([_padded_after(w, 20_000) for w in waves])  # [2, 20000]
    counts = np.array([8000 // 160 + 1, 12000 // 160 + 1], np.int32)
    one = [np.asarray(bucketed(padded[i], counts[i])) for i in range(2)]
    assert len(traces) == 1  # one compilation for any count
    batched = np.asarray(logmel(padded, num_valid_frames=counts))  # [2, frames, 128]
    for i, wave in enumerate(waves):
        np.testing.assert_allclose(one[i][: counts[i]], np.asarray(logmel(wave)), atol=1e-5)
        np.testing.assert_allclose(batched[i], one[i], atol=1e-5)


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
