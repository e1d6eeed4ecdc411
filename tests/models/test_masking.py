"""Inverse block masking: exact counts, independence, static shapes, and block statistics that match masks
drawn by the reference implementation (tests/golden/ssl_masks.npz, copied from the golden ssl.npz;
``reference_masks_512`` is stored bit-packed along the token axis, 1 = masked)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from bat_jax.models.masking import (
    block_cover,
    draw_batch_masks,
    draw_clip_masks,
    draw_view_mask,
    keep_exactly,
    num_centres,
    num_kept,
)
from bat_jax.train.config import ssl_preset

# The recipe's masking (configs/pretrain/bat_base.py), the settings the reference masks were drawn with.
BAT = ssl_preset("bat_base")
MASKING = {"grid": BAT.grid, "mask_ratio": BAT.mask_ratio, "block": BAT.mask_block, "adjust": BAT.mask_adjust}
GRID = (64, 8)  # (time patches, freq patches), token index t * 8 + f
N = GRID[0] * GRID[1]
K = 102


@pytest.fixture(scope="module")
def golden(golden_dir):
    with np.load(golden_dir / "ssl_masks.npz") as f:
        ref = np.unpackbits(f["reference_masks_512"], axis=1, count=N).astype(bool)  # [512, N], True = masked
        return {"reference_masks": ref, "mask": f["mask"].astype(bool), "ids_keep": f["ids_keep_sorted"]}


# One compiled masking function shared by the tests (compiling is the slow part on a CPU).
_masks = jax.jit(functools.partial(draw_batch_masks, **MASKING), static_argnames=("batch_size", "num_views"))


@pytest.fixture(scope="module")
def ours():
    """64 clips × 16 views = 1024 masks drawn by our masking; bool [1024, N] and int32 [1024, K]."""
    mask, ids_keep = _masks(jax.random.key(0), batch_size=64, num_views=16)
    return np.asarray(mask), np.asarray(ids_keep)


def neighbour_agreement(kept: np.ndarray) -> float:
    """Over all (kept patch, 4-neighbour inside the grid) pairs: the fraction whose neighbour is also kept."""
    g = kept.reshape(-1, *GRID)
    both = (g[:, 1:] & g[:, :-1]).sum() + (g[:, :, 1:] & g[:, :, :-1]).sum()
    # every kept patch counts each of its in-grid neighbours once
    pairs = (g[:, 1:].sum() + g[:, :-1].sum()) + (g[:, :, 1:].sum() + g[:, :, :-1].sum())
    return float(2 * both / pairs)


def mean_region_size(kept: np.ndarray) -> float:
    """Mean size of the 4-connected kept regions, pooled over all masks."""
    g = kept.reshape(-1, *GRID)
    regions = sum(ndimage.label(m)[1] for m in g)
    return float(g.sum() / regions)


def test_counts_and_arithmetic():
    assert BAT.grid == GRID
    assert num_kept(N, 0.8) == K
    assert num_centres(N, 0.8, 5, 0.07) == 5


def test_reference_masks_keep_exactly_102(golden):
    assert golden["reference_masks"].shape == (512, N)
    np.testing.assert_array_equal((~golden["reference_masks"]).sum(axis=1), K)
    np.testing.assert_array_equal((~golden["mask"]).sum(axis=1), K)
    # the golden ids_keep_sorted are the kept tokens in ascending order
    kept_ids = np.stack([np.flatnonzero(~m) for m in golden["mask"]])
    np.testing.assert_array_equal(kept_ids, golden["ids_keep"])


def test_exact_count_sorted_ids_and_consistency(ours):
    mask, ids_keep = ours
    assert mask.shape == (1024, N) and mask.dtype == np.bool_
    assert ids_keep.shape == (1024, K) and ids_keep.dtype == np.int32
    np.testing.assert_array_equal((~mask).sum(axis=1), K)
    assert np.all(np.diff(ids_keep, axis=1) > 0)  # strictly ascending, so no duplicates
    np.testing.assert_array_equal(np.take_along_axis(mask, ids_keep, axis=1), False)


def test_block_statistics_match_reference(golden, ours):
    ref_kept = ~golden["reference_masks"]
    our_kept = ~ours[0]
    for stat in (neighbour_agreement, mean_region_size):
        ref, got = stat(ref_kept), stat(our_kept)
        assert abs(got - ref) <= 0.05 * ref, f"{stat.__name__}: ours {got:.4f}, reference {ref:.4f}"
    # sanity: the statistics separate block masks from uniformly random masks with the same count
    rng = np.random.default_rng(0)
    uniform = np.zeros((512, N), bool)
    for row in uniform:
        row[rng.choice(N, K, replace=False)] = True
    assert neighbour_agreement(uniform) < 0.5 * neighbour_agreement(ref_kept)


def test_block_cover_matches_max_pool():
    """The dilation equals a stride-1 max-pool with padding block // 2 cropped to the grid (odd and even)."""
    rng = np.random.default_rng(1)
    for block in (1, 4, 5):
        centres = rng.integers(0, N, size=7)
        onehot = np.zeros(GRID)
        onehot.reshape(-1)[centres] = 1
        pad = block // 2
        padded = np.pad(onehot, pad)
        pooled = np.zeros(GRID)
        for t in range(GRID[0]):
            for f in range(GRID[1]):
                pooled[t, f] = padded[t : t + block, f : f + block].max()
        got = np.asarray(block_cover(jnp.asarray(centres), GRID, block)).reshape(GRID)
        np.testing.assert_array_equal(got, pooled.astype(bool), err_msg=f"block {block}")


def test_keep_exactly_prefers_blocks_then_fills_uniformly():
    rng = np.random.default_rng(2)
    keep = jax.jit(jax.vmap(keep_exactly, in_axes=(None, 0, None)), static_argnums=2)
    noise = jnp.asarray(rng.integers(0, 2**32, size=(20, N), dtype=np.uint32))  # 20 draws
    few = np.zeros(N, bool)
    few[rng.choice(N, 60, replace=False)] = True  # fewer preferred patches than K: all kept, 42 added
    many = np.zeros(N, bool)
    many[rng.choice(N, 200, replace=False)] = True  # more than K: K of them kept, nothing else
    ids_few = np.asarray(keep(jnp.asarray(few), noise, K))  # [20, K]
    ids_many = np.asarray(keep(jnp.asarray(many), noise, K))  # [20, K]
    assert np.all(np.diff(ids_few, axis=1) > 0) and np.all(np.diff(ids_many, axis=1) > 0)
    for a, b in zip(ids_few, ids_many, strict=True):
        assert set(np.flatnonzero(few)) <= set(a)
        assert set(b) <= set(np.flatnonzero(many))
    # the choice is spread over the candidates, not stuck on a few
    assert len(np.unique(ids_few)) > 60 + 300  # 42 · 20 fills over 452 other patches
    assert len(np.unique(ids_many)) > 180  # 102 · 20 picks among 200 patches


def test_views_and_keys_differ(ours):
    mask = ours[0]
    assert len({row.tobytes() for row in mask[:16]}) == 16  # every view of a clip has its own mask
    other, _ = _masks(jax.random.key(1), batch_size=64, num_views=16)
    assert not np.array_equal(mask, np.asarray(other))
    again, _ = _masks(jax.random.key(0), batch_size=64, num_views=16)
    np.testing.assert_array_equal(mask, np.asarray(again))  # deterministic for a key
    assert _masks._cache_size() == 1  # new keys reuse the compiled function


def test_batched_layout(ours):
    """Clip-major rows: row b · V + v is view v of clip b, drawn with key split(split(key, B)[b], V)[v]."""
    mask, ids_keep = ours
    b, v = 5, 11
    view_key = jax.random.split(jax.random.split(jax.random.key(0), 64)[b], 16)[v]
    one_mask, one_ids = jax.jit(functools.partial(draw_view_mask, **MASKING))(view_key)
    np.testing.assert_array_equal(mask[b * 16 + v], np.asarray(one_mask))
    np.testing.assert_array_equal(ids_keep[b * 16 + v], np.asarray(one_ids))


def test_other_grid_and_ratio():
    fn = jax.jit(draw_clip_masks, static_argnames=("num_views", "grid", "mask_ratio", "block", "adjust"))
    mask, ids_keep = fn(jax.random.key(0), num_views=2, grid=(4, 8), mask_ratio=0.5, block=3, adjust=0.07)
    assert mask.shape == (2, 32) and ids_keep.shape == (2, 16)
    np.testing.assert_array_equal((~np.asarray(mask)).sum(axis=1), 16)


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="mask_ratio"):
        draw_clip_masks(jax.random.key(0), 2, **{**MASKING, "mask_ratio": 1.0})
    with pytest.raises(ValueError, match="keeps no patch"):
        draw_clip_masks(jax.random.key(0), 2, grid=(2, 2), mask_ratio=0.9, block=5, adjust=0.07)
