"""Class-balanced sampling of training records (BirdSet HSN's class-balanced `WeightedRandomSampler`,
PAPER.md §1.3): per-record weights from the labels, and a Grain `MapDataset` that draws records with
replacement in proportion to them, reproducibly from (seed, process, epoch).

Weights (`class_balanced_weights`), as the official code's samplers: a record's weight is the *mean* over
its distinct labels of 1 / count(label), count(label) = the number of training records carrying that label:

    w_r = (1 / |labels(r)|) Σ_{c ∈ labels(r)} 1 / n_c

* The official code weights AS-2M's records so (`data/factory.py`: the mean of 1 / (class count) over a
  clip's labels) and HSN's by the inverse count of each clip's first label, the same for the single-label
  clips that make up HSN's training set (our records keep labels sorted, not in the source's order, so
  "first" is not defined here). For single-label data every class is then drawn equally often.
* A record without a label gets the smallest nonzero class weight, 1 / max_c n_c: it is drawn as often as a
  record of the most common class (the official code gives such AS-2M records weight 1, as often as a
  class with one record). When no record has a label, every weight is 1 (uniform draws).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

SAMPLERS = ("shuffle", "class_balanced")


def check_sampler(sampler: Any, where: str) -> str:
    """`sampler` if it is one of SAMPLERS, else a one-line ValueError naming `where` and the allowed ones."""
    if sampler not in SAMPLERS:
        raise ValueError(f"{where}: expected sampler one of {', '.join(SAMPLERS)}, found {sampler!r}")
    return sampler


def class_balanced_weights(labels: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """float64 [N] weights of N records, w_r = mean_{c ∈ labels(r)} 1 / n_c (see the module docstring).

    `labels`: a multi-hot (or 0/1 float) array [N, C], or each record's class indices (duplicates count
    once)."""
    if isinstance(labels, np.ndarray) and labels.ndim == 2:
        hot = labels > 0
    else:
        rows = [sorted({int(c) for c in row}) for row in labels]
        if any(c < 0 for row in rows for c in row):
            raise ValueError("class-balanced weights: expected class indices >= 0, found a negative one")
        num_classes = 1 + max((row[-1] for row in rows if row), default=-1)
        hot = np.zeros((len(rows), num_classes), bool)
        for r, row in enumerate(rows):
            hot[r, row] = True
    counts = hot.sum(axis=0)  # [C]
    if not counts.any():
        return np.ones(hot.shape[0], np.float64)
    class_weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)  # [C]; absent classes: 0
    per_record = hot.sum(axis=1)  # [N] labels of each record
    weights = (hot.astype(np.float64) @ class_weights) / np.maximum(per_record, 1)  # [N]
    weights[~hot.any(axis=1)] = 1.0 / counts.max()  # unlabelled records: the smallest class weight
    return weights


def draws(weights: np.ndarray, size: int, entropy: Sequence[int]) -> np.ndarray:
    """int64 [size] record positions in [0, len(weights)) drawn with replacement, P(r) ∝ weights[r], from
    numpy's Generator seeded by `entropy` (e.g. (seed, process, epoch))."""
    p = np.asarray(weights, np.float64)
    return np.random.default_rng(list(entropy)).choice(p.shape[0], size=size, p=p / p.sum())


class WeightedDrawsMapDataset(grain.MapDataset):
    """An endless stream over `parent` (a finite MapDataset, e.g. one process's share of the records):
    element i is parent[draws_e[i mod n]], e = i // n, n = `draws_per_epoch`, where draws_e are drawn with
    replacement in proportion to `weights` from (seed, process_index, e). Random access and a pure function
    of i, so Grain's iterator state (the next index), worker slicing and resuming work as for `.shuffle()`
    then `.repeat()`."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(
        self,
        parent: grain.MapDataset,
        weights: np.ndarray,
        *,
        seed: int,
        process_index: int = 0,
        draws_per_epoch: int | None = None,
    ):
        super().__init__(parent)
        weights = np.asarray(weights, np.float64).reshape(-1)
        if weights.shape[0] != len(parent):
            raise ValueError(
                f"weighted draws: expected one weight per record ({len(parent)}), found {weights.shape[0]}"
            )
        if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
            raise ValueError("weighted draws: expected finite weights >= 0 with a positive sum")
        self._weights = weights
        self._entropy = (int(seed), int(process_index))
        self._draws_per_epoch = int(draws_per_epoch or len(parent))
        self._epoch_draws: tuple[int, np.ndarray] | None = None  # (epoch, its draws): the last one used

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"WeightedDrawsMapDataset(draws_per_epoch={self._draws_per_epoch})"

    def record(self, index: int) -> int:
        """The parent position drawn at stream position `index`."""
        epoch, k = divmod(int(index), self._draws_per_epoch)
        cached = self._epoch_draws  # one read: threads may replace it meanwhile
        if cached is None or cached[0] != epoch:
            cached = (epoch, draws(self._weights, self._draws_per_epoch, (*self._entropy, epoch)))
            self._epoch_draws = cached
        return int(cached[1][k])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.record(index)]

    def _getitems(self, indices: Sequence[int]):
        return self._parent._getitems([self.record(i) for i in indices])  # noqa: SLF001

    @property
    def _element_spec(self) -> Any:
        return self._parent._element_spec  # noqa: SLF001  (the parent's elements, reordered)
