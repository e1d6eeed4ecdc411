"""Probe metrics against scikit-learn on random data: classes without positives, masks, shapes, errors."""

import doctest
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, average_precision_score, f1_score

from bat_jax.probe import metrics


def _random(seed, n=40, c=5, multilabel=True):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, c)) * 2.0  # [N, C]
    if multilabel:
        targets = (rng.uniform(size=(n, c)) < 0.3).astype(np.int64)
    else:
        targets = rng.integers(0, c, n)
    return logits, targets


def test_docstring_examples_run():
    assert doctest.testmod(metrics).failed == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_matches_sklearn_on_random_data(seed):
    logits, targets = _random(seed)
    m = metrics.classification_metrics(logits, targets, multilabel=True)
    probs = 1.0 / (1.0 + np.exp(-logits))
    assert m["map"] == pytest.approx(average_precision_score(targets, probs, average="macro"), abs=1e-12)
    assert m["per_class_ap"] == pytest.approx(average_precision_score(targets, probs, average=None).tolist())
    assert m["f1"] == pytest.approx(f1_score(targets, probs >= 0.5, average="macro", zero_division=0))
    sk_f1 = f1_score(targets, probs >= 0.5, average=None, zero_division=0).tolist()
    assert m["per_class_f1"] == pytest.approx(sk_f1, abs=1e-15)
    assert m["accuracy"] is None and m["num_examples"] == 40 and m["num_scored_classes"] == 5


@pytest.mark.parametrize("seed", [0, 1])
def test_single_label_matches_sklearn_on_softmax(seed):
    logits, labels = _random(seed, multilabel=False)
    m = metrics.classification_metrics(logits, labels, multilabel=False)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    onehot = np.eye(5)[labels]
    assert m["accuracy"] == pytest.approx(accuracy_score(labels, logits.argmax(1)))
    assert m["map"] == pytest.approx(average_precision_score(onehot, probs, average="macro"), abs=1e-12)
    assert m["f1"] == pytest.approx(f1_score(labels, logits.argmax(1), average="macro"))
    # one-hot targets give the same figures as class indices
    assert metrics.classification_metrics(logits, onehot, multilabel=False) == m
    # AP on softmax differs from AP on logits (softmax is not monotone per class): the choice matters
    assert m["map"] != pytest.approx(average_precision_score(onehot, logits, average="macro"), abs=1e-9)


def test_class_without_positives_is_null_and_left_out_of_the_macro_means():
    logits, targets = _random(3, c=4)
    targets[:, 2] = 0  # class 2: no positive clip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our wrapper never triggers sklearn's no-positive warning
        m = metrics.classification_metrics(logits, targets, multilabel=True)
    probs = 1.0 / (1.0 + np.exp(-logits))
    scored = [0, 1, 3]
    assert m["per_class_ap"][2] is None and m["per_class_f1"][2] is None
    assert m["num_scored_classes"] == 3
    assert m["map"] == pytest.approx(average_precision_score(targets[:, scored], probs[:, scored]))
    assert m["f1"] == pytest.approx(
        f1_score(targets[:, scored], probs[:, scored] >= 0.5, average="macro", zero_division=0)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sklearn_macro = average_precision_score(targets, probs, average="macro")  # counts class 2 as AP 0
    assert m["map"] > sklearn_macro


def test_single_label_class_absent_from_the_evaluated_clips():
    logits, labels = _random(4, multilabel=False)
    labels[labels == 4] = 0
    m = metrics.classification_metrics(logits, labels, multilabel=False)
    assert m["per_class_ap"][4] is None and m["num_scored_classes"] == 4
    assert m["f1"] == pytest.approx(f1_score(labels, logits.argmax(1), labels=[0, 1, 2, 3], average="macro"))


def test_mask_excludes_padded_clips():
    logits, targets = _random(5)
    mask = np.arange(40) < 29
    padded = logits.copy()
    padded[29:] = 50.0  # garbage in padded rows must not count
    m = metrics.classification_metrics(padded, targets, multilabel=True, mask=mask)
    assert m == metrics.classification_metrics(logits[:29], targets[:29], multilabel=True)
    assert m["num_examples"] == 29


def test_float32_inputs_are_scored_in_float64():
    logits, targets = _random(6)
    m32 = metrics.classification_metrics(logits.astype(np.float32), targets, multilabel=True)
    probs = 1.0 / (1.0 + np.exp(-logits.astype(np.float32).astype(np.float64)))
    assert m32["map"] == average_precision_score(targets, probs, average="macro")


def test_frame_metrics_flatten_frames_and_drop_padded_ones():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 6, 4))  # [N, T, C]
    targets = (rng.uniform(size=(3, 6, 4)) < 0.3).astype(np.int64)
    targets[..., 3] = 0
    mask = np.array([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4], bool)
    m = metrics.frame_metrics(logits, targets, mask)
    probs = (1.0 / (1.0 + np.exp(-logits)))[mask]  # [10 frames, C]
    flat = targets[mask]
    assert m["num_frames"] == 12 and m["per_class_ap"][3] is None
    assert m["per_class_ap"][:3] == pytest.approx(
        average_precision_score(flat[:, :3], probs[:, :3], average=None).tolist()
    )
    assert m["frame_map"] == pytest.approx(np.mean(m["per_class_ap"][:3]))
    assert m["frame_map_micro"] == pytest.approx(average_precision_score(flat, probs, average="micro"))
    changed = logits.copy()
    changed[~mask] = -logits[~mask]
    assert metrics.frame_metrics(changed, targets, mask) == m


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: metrics.classification_metrics(np.zeros(4), [0, 1, 0, 1], multilabel=False),
            r"expected logits \[N, C\] with 2 dimensions, found shape \(4,\)",
        ),
        (
            lambda: metrics.classification_metrics(np.zeros((4, 3)), np.zeros((4, 2)), multilabel=True),
            r"expected class indices \[N\] or a multi-hot matrix \[N, 3\], found shape \(4, 2\)",
        ),
        (
            lambda: metrics.classification_metrics(np.zeros((4, 3)), [0, 1, 2], multilabel=False),
            r"expected targets for the 4 clips of logits, found 3",
        ),
        (
            lambda: metrics.classification_metrics(np.zeros((2, 3)), [0, 3], multilabel=False),
            r"expected class indices in \[0, 3\)",
        ),
        (
            lambda: metrics.classification_metrics(np.zeros((2, 2)), [[1, 1], [1, 0]], multilabel=False),
            r"expected exactly one positive class per clip, found \[2\] in clips \[0\]",
        ),
        (
            lambda: metrics.classification_metrics(
                np.zeros((2, 2)), [0, 1], multilabel=False, mask=[1, 1, 0]
            ),
            r"expected mask of shape \(2,\), found \(3,\)",
        ),
        (
            lambda: metrics.classification_metrics(np.zeros((2, 2)), [0, 1], multilabel=False, mask=[0, 0]),
            r"expected at least one unmasked example, found none",
        ),
        (
            lambda: metrics.classification_metrics([[np.nan, 0.0]], [0], multilabel=False),
            r"expected finite logits",
        ),
        (
            lambda: metrics.frame_metrics(np.zeros((2, 3, 4)), np.zeros((2, 3, 5))),
            r"expected targets of the logits' shape \(2, 3, 4\) \[N, T, C\], found \(2, 3, 5\)",
        ),
        (
            lambda: metrics.frame_metrics(np.zeros((2, 3, 4)), np.zeros((2, 3, 4)), mask=np.ones(2)),
            r"expected mask of shape \(2, 3\), found \(2,\)",
        ),
    ],
)
def test_bad_input_is_refused_naming_expected_and_found(call, message):
    with pytest.raises(ValueError, match=message):
        call()
