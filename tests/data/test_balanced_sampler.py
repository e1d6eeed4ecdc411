"""Class-balanced sampling of the training loader (`PretrainLoader(sampler="class_balanced")`, BirdSet HSN's
class-balanced `WeightedRandomSampler`): the weights, balanced class frequencies on a heavily imbalanced toy
set where "shuffle" is not balanced, determinism, resuming, and the per-process shares."""

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from bat_jax.data import pipeline, records, sampling

RARE, COMMON = 2, 50  # records of class 0 (rare) and class 1 (common)
BATCH = 32
BATCHES = 100  # 3,200 drawn records


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """One shard: records 0-1 of class 0, records 2-51 of class 1 (tiny 16 x 8 spectrograms)."""
    path = tmp_path_factory.mktemp("balanced") / "train-00000-of-00001.arrayrecord"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for i in range(RARE + COMMON):
        spec = np.full((16, 8), 0.5, np.float16)
        writer.write(records.encode(records.Clip(spec, 16, f"clip{i}", (0,) if i < RARE else (1,))))
    writer.close()
    return [str(path)]


def _loader(paths, sampler, seed=0, **kwargs):
    kwargs = {"global_batch_size": BATCH, "target_frames": 16, "num_classes": 2, "roll": False, **kwargs}
    return pipeline.PretrainLoader(paths, seed=seed, sampler=sampler, **kwargs)


def _clip_indices(loader, n):
    return np.stack([np.asarray(next(loader)["clip_index"]) for _ in range(n)])  # [n, B]


def test_weights_are_the_mean_inverse_count_over_labels_and_unlabelled_get_the_smallest():
    # counts: class 0 in 2 records, class 1 in 2, class 2 in 1 (a duplicate label counts once)
    labels = [(0,), (0, 1), (1,), (), (2, 2)]
    want = [1 / 2, (1 / 2 + 1 / 2) / 2, 1 / 2, 1 / 2, 1 / 1]  # the unlabelled record: min class weight 1 / 2
    np.testing.assert_allclose(sampling.class_balanced_weights(labels), want)
    hot = np.zeros((5, 4), np.float32)  # the cache's multi-hot labels (class 3 absent: ignored)
    for r, row in enumerate(labels):
        hot[r, list(row)] = 1
    np.testing.assert_allclose(sampling.class_balanced_weights(hot), want)
    np.testing.assert_array_equal(sampling.class_balanced_weights([(), ()]), [1.0, 1.0])  # no label: uniform


def test_multilabel_weights_follow_the_official_as2m_rule_and_draws_follow_the_weights():
    # class 0: 2 records (both also class 1), class 1: 50, class 2: 10 (5 of them also class 1)
    labels = [(0, 1)] * 2 + [(1,)] * 43 + [(1, 2)] * 5 + [(2,)] * 5
    counts = {0: 2, 1: 50, 2: 10}
    official = [sum(1 / counts[c] for c in row) / len(row) for row in labels]  # data/factory.py's AS-2M rule
    weights = sampling.class_balanced_weights(labels)
    np.testing.assert_allclose(weights, official)
    n = 20_000
    rows = sampling.draws(weights, n, (0, 0, 0))
    # the 2 records with the rare class: drawn with probability sum(w[:2]) / sum(w), within 4 binomial sd
    p = weights[:2].sum() / weights.sum()
    assert abs(np.isin(rows, [0, 1]).mean() - p) < 4 * np.sqrt(p * (1 - p) / n)
    assert p > 5 * 2 / len(labels)  # 0.24: over 5 times their share under uniform draws (2 / 55)


def test_class_balanced_draws_balance_classes_and_shuffle_does_not(imbalanced):
    n = BATCHES * BATCH
    freq = {}
    for sampler in ("shuffle", "class_balanced"):
        with _loader(imbalanced, sampler, prefetch=0) as loader:
            labels = np.concatenate([np.asarray(next(loader)["labels"]) for _ in range(BATCHES)])  # [n, 2]
        assert labels.shape == (n, 2) and np.all(labels.sum(1) == 1)
        freq[sampler] = labels[:, 0].mean()  # share of rare-class records
    # Balanced: each draw is the rare class with p = 1/2 (its 2 records weigh 1/2 each, the 50 common ones
    # 1/50 each). Tolerance 4 binomial standard deviations, sqrt(p (1 - p) / n) = 0.0088 for n = 3,200.
    sd = np.sqrt(0.5 * 0.5 / n)
    assert abs(freq["class_balanced"] - 0.5) < 4 * sd, freq
    # Shuffle: every record once per epoch, the rare class at 2/52 = 0.038 (a partial last epoch aside).
    assert abs(freq["shuffle"] - RARE / (RARE + COMMON)) < 0.01, freq


def test_class_balanced_is_seeded_and_deterministic(imbalanced):
    with _loader(imbalanced, "class_balanced", prefetch=0) as a, _loader(imbalanced, "class_balanced") as b:
        first, again = _clip_indices(a, 6), _clip_indices(b, 6)
    np.testing.assert_array_equal(first, again)
    with _loader(imbalanced, "class_balanced", seed=1, prefetch=0) as c:
        assert not np.array_equal(_clip_indices(c, 6), first)
    # with replacement: records repeat within an epoch of 52 draws (the rare two ~26 times each)
    assert len(np.unique(first[:1])) < BATCH


@pytest.mark.parametrize("worker_count", [0, 1])
def test_class_balanced_resumes_from_get_state(imbalanced, worker_count):
    with _loader(imbalanced, "class_balanced", worker_count=worker_count) as straight:
        _clip_indices(straight, 3)
        state = straight.get_state()
        rest = _clip_indices(straight, 5)  # crosses epochs (52 draws each)
    with _loader(imbalanced, "class_balanced", worker_count=worker_count) as resumed:
        resumed.set_state(state)
        np.testing.assert_array_equal(_clip_indices(resumed, 5), rest)


def test_each_process_draws_from_its_own_share(imbalanced):
    shares = []
    for p in range(2):
        kwargs = {"global_batch_size": 16, "process_index": p, "process_count": 2, "prefetch": 0}
        with _loader(imbalanced, "class_balanced", **kwargs) as loader:
            shares.append(_clip_indices(loader, 20))  # [20, 8]: 8 rows per process
    assert shares[0].shape == (20, 8)
    assert shares[0].min() >= 0 and shares[0].max() < 26 and shares[1].min() >= 26 and shares[1].max() < 52
    # weights from the global counts: process 0's share holds both rare records (weight 1/2 each) and 24 of
    # 1/50, so it draws them with p = 1 / 1.48; process 1 has none.
    rare = np.isin(shares[0], [0, 1]).mean()
    sd = np.sqrt((1 / 1.48) * (1 - 1 / 1.48) / shares[0].size)
    assert abs(rare - 1 / 1.48) < 4 * sd


def test_unknown_sampler_is_refused_in_one_line(imbalanced):
    with pytest.raises(ValueError, match=r"^probe training pipeline: expected sampler one of shuffle, "):
        _loader(imbalanced, "balanced")
