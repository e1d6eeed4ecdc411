"""Evaluation splits of a probe: a seeded stratified hold-out, and K folds from a per-clip fold value.

Hold-out (`holdout_split`), for a dataset prepared as one split: a fraction of the clips is held out for
validation, deterministically from a seed (same seed, same split; another seed, another split).
Single-label: stratified per class: of a class's n clips, round(fraction * n) (half up) are held out, at
least 1 and at most n - 1 when n >= 2 (so every class with two or more clips is in both sets), none when
n == 1.
Multi-label: each clip is stratified on its rarest label (the one with the fewest clips in the whole set;
ties to the lower class index), clips without labels form their own stratum, and each stratum is split as a
single-label class is. This keeps every label with two or more clips whose rarest label it is in both sets;
it is a documented simplification of iterative stratification (Sechidis et al., 2011).

K folds (`kfold_splits`), e.g. ESC-50's five folds stored by `bat-jax prepare --fold-column fold`: the
distinct fold values, sorted, and for each fold k: test = the clips of fold k, train = all others. Every clip
needs a fold; there must be at least two distinct values; integer folds must have no gap (1, 2, 4 means fold
3 lost all its clips, e.g. skipped at prepare time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _as_label_lists(labels: Sequence, where: str) -> list[tuple[int, ...]]:
    out = []
    for i, value in enumerate(labels):
        if isinstance(value, int | np.integer):
            out.append((int(value),))
            continue
        try:
            values = tuple(int(v) for v in np.asarray(value).reshape(-1))
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: expected a class index or a list of class indices for clip {i}, found {value!r}"
            ) from None
        if any(v < 0 for v in values):
            raise ValueError(f"{where}: expected class indices >= 0 for clip {i}, found {list(values)}")
        out.append(values)
    return out


def _split_strata(strata: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A bool [N] validation mask: per stratum value, round(fraction * n) clips in [1, n - 1] (n >= 2)."""
    val = np.zeros(strata.shape[0], bool)
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)
        n = members.shape[0]
        if n < 2:
            continue
        k = min(max(int(fraction * n + 0.5), 1), n - 1)  # rounded half up
        val[rng.permutation(members)[:k]] = True
    return val


def holdout_split(labels: Sequence, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), both sorted int64, of a seeded stratified hold-out.

    labels: per clip, a class index (single-label) or a list / array of class indices (multi-label; a set
    where every clip has exactly one label is treated as single-label). fraction in (0, 1).

    >>> train, val = holdout_split([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], fraction=0.2, seed=0)
    >>> len(train), len(val), sorted({[0, 0, 0, 0, 0, 1, 1, 1, 1, 1][i] for i in val})
    (8, 2, [0, 1])
    """
    where = "holdout_split"
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"{where}: expected a hold-out fraction in (0, 1), found {fraction!r}")
    lists = _as_label_lists(labels, where)
    if len(lists) < 2:
        raise ValueError(f"{where}: expected at least 2 clips to hold some out, found {len(lists)}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    if all(len(x) == 1 for x in lists):
        strata = np.asarray([x[0] for x in lists], np.int64)
    else:
        counts: dict[int, int] = {}
        for x in lists:
            for c in set(x):
                counts[c] = counts.get(c, 0) + 1
        strata = np.asarray([min(set(x), key=lambda c: (counts[c], c)) if x else -1 for x in lists], np.int64)
    val = _split_strata(strata, float(fraction), rng)
    if not val.any():
        raise ValueError(
            f"{where}: expected a class (or rarest label) with at least 2 clips to hold out, found "
            f"{len(lists)} clips each in a class of its own"
        )
    return np.flatnonzero(~val), np.flatnonzero(val)


def _kind(value) -> str:
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return "int"
    return "str" if isinstance(value, str) else type(value).__name__


@dataclass(frozen=True)
class Fold:
    """One cross-validation fold: `value` (the fold's name as stored), sorted int64 index arrays."""

    value: int | str
    train: np.ndarray
    test: np.ndarray


def kfold_splits(folds: Sequence[int | str | None]) -> list[Fold]:
    """One Fold per distinct fold value, sorted: test = the clips of that fold, train = the others.

    folds: the fold of each clip (ints, or strings; not a mix), e.g. a prepared split's manifest
    `folds.by_record` list. Raises ValueError for a clip without a fold, fewer than two distinct values,
    mixed types, or integer folds with a gap.

    >>> [(f.value, f.test.tolist()) for f in kfold_splits([2, 1, 2, 1, 3])]
    [(1, [1, 3]), (2, [0, 2]), (3, [4])]
    """
    where = "kfold_splits"
    values = list(folds)
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise ValueError(
            f"{where}: expected a fold value for every clip, found {len(missing)} clips without one "
            f"(e.g. clips {missing[:5]}); prepare with --fold-column, which skips files the CSV does not list"
        )
    kinds = {_kind(v) for v in values}
    if len(kinds) > 1 or not kinds <= {"int", "str"}:
        raise ValueError(
            f"{where}: expected fold values that are all integers or all strings, found {sorted(kinds)}"
        )
    values = [int(v) for v in values] if kinds == {"int"} else [str(v) for v in values]
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise ValueError(
            f"{where}: expected at least 2 distinct fold values for cross-validation, found "
            f"{distinct} over {len(values)} clips"
        )
    if kinds == {"int"}:
        gaps = sorted(set(range(distinct[0], distinct[-1] + 1)) - set(distinct))
        if gaps:
            raise ValueError(
                f"{where}: expected consecutive integer folds {distinct[0]}..{distinct[-1]}, found no clip "
                f"in fold(s) {gaps} (were they skipped at prepare time?)"
            )
    array = np.asarray(values, dtype=object)
    out = []
    for value in distinct:
        test = np.asarray([i for i, v in enumerate(array) if v == value], np.int64)
        train = np.asarray([i for i, v in enumerate(array) if v != value], np.int64)
        out.append(Fold(value, train, test))
    return out
