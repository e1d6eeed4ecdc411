"""Hold-out and K-fold splits: stratification, determinism, and the errors on bad fold columns."""

import doctest

import numpy as np
import pytest

from bat_jax.probe import splits


def test_docstring_examples_run():
    assert doctest.testmod(splits).failed == 0


def _check_partition(train, val, n):
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_single_label_holdout_is_stratified_per_class():
    rng = np.random.default_rng(0)
    sizes = {0: 50, 1: 20, 2: 7, 3: 2, 4: 1}
    labels = rng.permutation(np.concatenate([np.full(n, c) for c, n in sizes.items()]))
    train, val = splits.holdout_split(labels, fraction=0.2, seed=3)
    _check_partition(train, val, labels.size)
    held = {c: int(np.sum(labels[val] == c)) for c in sizes}
    assert held == {0: 10, 1: 4, 2: 1, 3: 1, 4: 0}  # half-up rounding, >= 1 and <= n - 1, singletons train
    assert set(labels[train]) == set(sizes)


def test_same_seed_same_split_other_seed_other_split():
    labels = np.arange(160) % 4  # 40 per class: 10 held out each
    a = splits.holdout_split(labels, 0.25, seed=1)
    b = splits.holdout_split(list(labels), 0.25, seed=1)
    c = splits.holdout_split(labels, 0.25, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == len(c[1]) == 40


def test_multilabel_holdout_stratifies_on_the_rarest_label():
    rng = np.random.default_rng(1)
    labels = []
    for i in range(120):
        clip = {0} | ({1} if i % 3 == 0 else set()) | ({2} if i % 20 == 0 else set())  # 2 is rare
        labels.append(sorted(clip))
    labels += [[], [], [], []]  # unlabelled clips: a stratum of their own
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    train, val = splits.holdout_split(labels, fraction=0.25, seed=0)
    _check_partition(train, val, len(labels))
    for c in (0, 1, 2):
        assert any(c in labels[i] for i in val) and any(c in labels[i] for i in train)
    rare = [i for i, x in enumerate(labels) if 2 in x]  # 6 clips, rarest label 2: round(1.5) = 2 held out
    assert len(set(rare) & set(val.tolist())) == 2
    assert sum(1 for i in val if not labels[i]) == 1


def test_label_lists_of_one_are_single_label():
    labels = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    as_lists = [np.array([c], np.int32) for c in labels]  # what records hold
    a, b = splits.holdout_split(labels, 0.3, 5), splits.holdout_split(as_lists, 0.3, 5)
    assert np.array_equal(a[1], b[1])


@pytest.mark.parametrize(
    ("labels", "fraction", "message"),
    [
        ([0, 1, 0, 1], 0.0, r"expected a hold-out fraction in \(0, 1\), found 0.0"),
        ([0, 1, 0, 1], 1, r"expected a hold-out fraction in \(0, 1\), found 1"),
        ([0], 0.5, r"expected at least 2 clips to hold some out, found 1"),
        ([0, 1, 2], 0.5, r"found 3 clips each in a class of its own"),
        ([0, "dog"], 0.5, r"for clip 1, found 'dog'"),
        ([0, [-1]], 0.5, r"expected class indices >= 0 for clip 1, found \[-1\]"),
    ],
)
def test_holdout_errors(labels, fraction, message):
    with pytest.raises(ValueError, match=message):
        splits.holdout_split(labels, fraction, seed=0)


def test_kfold_from_esc50_style_folds():
    folds = np.tile([1, 2, 3, 4, 5], 8).tolist()
    out = splits.kfold_splits(folds)
    assert [f.value for f in out] == [1, 2, 3, 4, 5]
    for f in out:
        _check_partition(f.train, f.test, 40)
        assert {folds[i] for i in f.test} == {f.value} and f.value not in {folds[i] for i in f.train}
    assert np.array_equal(np.sort(np.concatenate([f.test for f in out])), np.arange(40))


def test_kfold_string_folds_sorted_and_numpy_ints_accepted():
    assert [f.value for f in splits.kfold_splits(["b", "a", "c", "a"])] == ["a", "b", "c"]
    assert [f.value for f in splits.kfold_splits(np.array([3, 2, 3], np.int32))] == [2, 3]


@pytest.mark.parametrize(
    ("folds", "message"),
    [
        (
            [1, 1, 1],
            r"expected at least 2 distinct fold values for cross-validation, found \[1\] over 3 clips",
        ),
        (
            [1, None, 2, ""],
            r"expected a fold value for every clip, found 2 clips without one \(e.g. clips \[1, 3\]\)",
        ),
        ([1, 2, 4], r"expected consecutive integer folds 1..4, found no clip in fold\(s\) \[3\]"),
        ([1, "2"], r"all integers or all strings, found \['int', 'str'\]"),
        ([1.0, 2.0], r"all integers or all strings, found \['float'\]"),
    ],
)
def test_kfold_errors(folds, message):
    with pytest.raises(ValueError, match=message):
        splits.kfold_splits(folds)
