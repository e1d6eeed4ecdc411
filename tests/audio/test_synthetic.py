import csv
import dataclasses
from collections import Counter

import librosa
import numpy as np
import pytest
import soundfile as sf

from bat_jax.audio import synthetic

SR = 16000
NUM_CLASSES = len(synthetic.CLASS_NAMES)


def short(**kw) -> synthetic.SyntheticConfig:
    """A config with short clips, so tests stay fast."""
    return synthetic.SyntheticConfig(**{"min_seconds": 1.0, "max_seconds": 2.5, **kw})


def test_class_names_are_stable_distinct_and_complete():
    assert len(synthetic.CLASS_NAMES) >= 10
    assert len(set(synthetic.CLASS_NAMES)) == len(synthetic.CLASS_NAMES)
    assert set(synthetic.EVENT_PARAMS) == set(synthetic.CLASS_NAMES)


def test_same_seed_and_index_give_identical_clips_and_other_seeds_differ():
    cfg = short(seed=7)
    a, la = synthetic.make_clip(5, cfg)
    b, lb = synthetic.make_clip(5, cfg)
    np.testing.assert_array_equal(a, b)
    assert la == lb
    c, _ = synthetic.make_clip(5, dataclasses.replace(cfg, seed=8))
    assert c.shape != a.shape or not np.array_equal(a, c)
    d, _ = synthetic.make_clip(6, cfg)
    assert d.shape != a.shape or not np.array_equal(a, d)


def test_clips_do_not_depend_on_generation_order():
    cfg = short(num_clips=6, multilabel=True)
    forward = {cid: (w, lab) for cid, w, lab in synthetic.iter_clips(cfg)}
    backward = list(synthetic.iter_clips(cfg, indices=[5, 3, 1, 4, 0, 2]))
    assert sorted(cid for cid, _, _ in backward) == sorted(forward)
    for cid, wave, labels in backward:
        np.testing.assert_array_equal(wave, forward[cid][0])
        assert labels == forward[cid][1]


def test_clip_ids_are_stable_and_sortable():
    ml, sl = synthetic.SyntheticConfig(multilabel=True), synthetic.SyntheticConfig(seed=3)
    assert synthetic.clip_id(123, ml) == "synth-ml-s0-000123"
    assert synthetic.clip_id(7, sl) == "synth-sl-s3-000007"
    ids = [synthetic.clip_id(i, ml) for i in (0, 9, 10, 99, 100, 1000)]
    assert ids == sorted(ids)


@pytest.mark.parametrize("multilabel", [False, True])
def test_default_clips_are_float32_bounded_finite_and_within_duration(multilabel):
    cfg = synthetic.SyntheticConfig(num_clips=NUM_CLASSES, multilabel=multilabel)
    lengths = []
    for _, wave, _ in synthetic.iter_clips(cfg):
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert np.all(np.isfinite(wave))
        peak = np.max(np.abs(wave))
        assert 0.0 < peak <= 1.0
        assert cfg.min_seconds * SR <= wave.size <= cfg.max_seconds * SR
        lengths.append(wave.size)
    assert len(set(lengths)) == len(lengths), "clip durations should be drawn per clip"


def test_custom_durations_are_respected():
    cfg = synthetic.SyntheticConfig(num_clips=8, min_seconds=1.25, max_seconds=1.5, event_seconds=(0.1, 3.0))
    for _, wave, _ in synthetic.iter_clips(cfg):
        assert 1.25 <= wave.size / SR <= 1.5


def test_single_label_clips_have_one_label_balanced_over_classes():
    cfg = short(num_clips=2 * NUM_CLASSES, seed=1)
    labels = [lab for _, _, lab in synthetic.iter_clips(cfg)]
    assert all(len(lab) == 1 for lab in labels)
    counts = Counter(lab[0] for lab in labels)
    assert counts == dict.fromkeys(range(NUM_CLASSES), 2)


def test_multilabel_clips_mix_one_to_three_distinct_classes():
    cfg = synthetic.SyntheticConfig(num_clips=60, multilabel=True, min_seconds=1.0, max_seconds=1.5, seed=2)
    labels = [lab for _, _, lab in synthetic.iter_clips(cfg)]
    for lab in labels:
        assert 1 <= len(lab) <= 3
        assert list(lab) == sorted(set(lab))
        assert all(0 <= c < NUM_CLASSES for c in lab)
    assert {len(lab) for lab in labels} == {1, 2, 3}
    per_class = Counter(c for lab in labels for c in lab)
    assert set(per_class) == set(range(NUM_CLASSES))
    assert min(per_class.values()) >= 5  # first class balanced: 60 / 12 = 5 each, plus the extra events


def test_single_and_multilabel_streams_differ():
    sl, _ = synthetic.make_clip(0, short())
    ml, _ = synthetic.make_clip(0, short(multilabel=True))
    assert sl.shape != ml.shape or not np.array_equal(sl, ml)


# --- the classes are acoustically distinct: a nearest-centroid classifier on simple features -------------

N_FFT, HOP, N_MELS = 512, 256, 40
MEL = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS)  # [M, F]


def clip_feature(wave: np.ndarray) -> np.ndarray:
    """Log-mel of the event span's three thirds + envelope and spectral-shape statistics."""
    frames = np.lib.stride_tricks.sliding_window_view(wave, N_FFT)[::HOP] * np.hanning(N_FFT)  # [T, N]
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2 + 1e-12  # [T, F]
    logmel = np.log(power @ MEL.T)  # [T, M]
    energy = np.log(power.sum(-1))  # [T]
    active = np.flatnonzero(energy > energy.max() - np.log(10.0**2.5))  # within 25 dB of the loudest
    span = slice(active[0], active[-1] + 1)
    thirds = [part.mean(0) for part in np.array_split(logmel[span], 3)]
    envelope = energy[span]
    mean_power = power[span].mean(0)  # [F]
    log_flatness = np.log(mean_power).mean() - np.log(mean_power.mean())
    mean_mel = logmel[span].mean(0)
    bandwidth = np.sum(mean_mel > mean_mel.max() - np.log(100.0))
    stats = [envelope.std(), np.abs(np.diff(envelope)).mean(), log_flatness, bandwidth]
    return np.concatenate(thirds + [np.asarray(stats)])


def test_classes_are_learnable_by_a_nearest_centroid_classifier():
    train_blocks, test_blocks = 10, 5  # clips per class
    cfg = synthetic.SyntheticConfig(
        num_clips=(train_blocks + test_blocks) * NUM_CLASSES,
        seed=11,
        min_seconds=1.0,
        max_seconds=3.0,
        snr_db=(40.0, 40.0),
    )
    feats, labels = [], []
    for _, wave, lab in synthetic.iter_clips(cfg):
        feats.append(clip_feature(wave))
        labels.append(lab[0])
    x, y = np.stack(feats), np.asarray(labels)  # [N, D], [N]
    n_train = train_blocks * NUM_CLASSES
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1e-6
    z = (x - mean) / std
    centroids = np.stack([z[:n_train][y[:n_train] == c].mean(0) for c in range(NUM_CLASSES)])  # [C, D]
    dist = ((z[n_train:, None, :] - centroids[None]) ** 2).sum(-1)  # [N_test, C]
    accuracy = np.mean(dist.argmin(-1) == y[n_train:])
    print(f"nearest-centroid accuracy {accuracy:.3f} over {len(dist)} held-out clips")
    assert accuracy >= 0.75, f"nearest-centroid accuracy {accuracy:.2f} (chance {1 / NUM_CLASSES:.2f})"


# --- writing a folder, speed mechanism, validation -------------------------------------------------------


def test_write_folder_writes_pcm16_wavs_and_a_labels_csv(tmp_path):
    cfg = synthetic.SyntheticConfig(num_clips=3, multilabel=True, min_seconds=1.0, max_seconds=1.0, seed=4)
    csv_path = synthetic.write_folder(tmp_path / "synth", cfg)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [f"{synthetic.clip_id(i, cfg)}.wav" for i in range(3)]
    for i, row in enumerate(rows):
        expected, labels = synthetic.make_clip(i, cfg)
        assert row["labels"].split(";") == [synthetic.CLASS_NAMES[c] for c in labels]
        wave, sr = sf.read(csv_path.parent / row["path"], dtype="float32")
        assert sr == SR and sf.info(csv_path.parent / row["path"]).subtype == "PCM_16"
        np.testing.assert_allclose(wave, expected, atol=1.0 / 32768 + 1e-6)


def test_noise_is_shaped_at_the_smallest_5_smooth_fft_length(monkeypatch):
    """Generation speed relies on fast FFT sizes (a prime-length FFT is many times slower), and clips stay
    identical to those made before scipy.fft.next_fast_len replaced our helper only if the size is the
    smallest 5-smooth number >= n (scipy's real-FFT size; its complex size is 11-smooth and would differ)."""

    def smooth(m):
        for q in (2, 3, 5):
            while m % q == 0:
                m //= q
        return m == 1

    sizes = []
    rfft = np.fft.rfft
    monkeypatch.setattr(np.fft, "rfft", lambda x, *a, **k: sizes.append(len(x)) or rfft(x, *a, **k))
    for n in [1, 2, 7, 97, 1000, 16001, 159_997, 160_000]:
        sizes.clear()
        noise = synthetic._coloured_noise(np.random.default_rng(0), n, SR, 1.0)
        assert noise.shape == (n,) and len(sizes) == 1
        m = sizes[0]
        assert m >= n and smooth(m)
        assert not any(smooth(k) for k in range(n, m)), f"{m} is not the smallest 5-smooth size >= {n}"


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"seed": -1}, "seed >= 0"),
        ({"sample_rate": 8000}, "sample_rate >= 16000"),
        ({"min_seconds": 3.0, "max_seconds": 2.0}, "min_seconds <= max_seconds"),
        ({"max_events": 0}, "max_events"),
        ({"snr_db": (10.0, 0.0)}, "snr_db"),
    ],
)
def test_bad_configs_are_refused_with_a_clear_message(kw, message):
    with pytest.raises(ValueError, match=message):
        synthetic.SyntheticConfig(**kw)
