"""Inverse block masking for BAT / data2vec 2.0 style pretraining, drawn on device with ``jax.random``.

The patch grid is time-major: a spectrogram [T, F] cut into 16×16 patches gives a (T/16, F/16) grid, token
index ``t * F/16 + f`` (BAT: 64 × 8 = 512 tokens). "Inverse" means the blocks are what the student KEEPS:

1. draw ``int(N · (keep_ratio + adjust) / block²)`` block centres uniformly (with replacement);
2. dilate each centre to a ``block × block`` square on the grid, clipped at the borders (a max-pool);
3. make the count exact, ``K = int(N · keep_ratio)`` kept patches per view: if the blocks cover more than K
   patches, a uniformly random subset of them is kept; if fewer, uniformly random other patches are added.

Step 3 has a static shape here: every patch gets the score ``in_block · 2³⁰ + u`` with u uniform random
30-bit integers, and the top K scores are kept. Block patches always outrank the others, and ranking by u is
a uniform random choice inside each group: the same distribution as the reference's sequential correction.

Shapes are static (N, K and the number of centres are Python integers), so a jitted step never recompiles
for a new key. Three levels, every number an argument (the recipe's are ``ssl.mask_*`` in
configs/pretrain/bat_base.py, passed on by ``bat_jax.models.ssl_objective``)::

    draw_view_mask(key, grid, mask_ratio, block, adjust)                   # one view:  [N], [K]
    draw_clip_masks(key, V, grid, mask_ratio, block, adjust)               # one clip:  [V, N], [V, K]
    draw_batch_masks(key, B, V, grid, mask_ratio, block, adjust)           # a batch:   [B·V, N], [B·V, K]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

_WHERE = "bat_jax/models/masking.py"


class BlockMask(NamedTuple):
    """``mask`` bool [..., N] (True = masked, i.e. hidden from the student and predicted by the decoder);
    ``ids_keep`` int32 [..., K], the kept token indices in ascending order."""

    mask: Array
    ids_keep: Array


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = int(N · (1 − mask_ratio)): the exact number of patches every view keeps."""
    return int(num_patches * (1 - mask_ratio))


def num_centres(num_patches: int, mask_ratio: float, block: int, adjust: float) -> int:
    """Number of block centres drawn per view: int(N · (1 − mask_ratio + adjust) / block²)."""
    return int(num_patches * ((1 - mask_ratio) + adjust) / (block**2))


def _check(grid: tuple[int, int], mask_ratio: float, block: int) -> None:
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(
            f"masking ({_WHERE}): expected grid = (time patches, freq patches), both >= 1, found {grid}"
        )
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"masking ({_WHERE}): expected 0 <= mask_ratio < 1, found {mask_ratio}")
    if block < 1:
        raise ValueError(f"masking ({_WHERE}): expected block size >= 1, found {block}")
    n = grid[0] * grid[1]
    if num_kept(n, mask_ratio) < 1:
        raise ValueError(
            f"masking ({_WHERE}): grid {grid} with mask_ratio {mask_ratio} keeps no patch "
            f"(int({n} · {1 - mask_ratio:.3g}) = 0); expected at least one kept patch"
        )


def block_cover(centres: Array, grid: tuple[int, int], block: int) -> Array:
    """bool [T·F]: the patches covered by ``block × block`` squares around ``centres`` (int [C], token
    indices), clipped at the grid borders. Same footprint as a stride-1 max-pool with kernel ``block`` and
    padding ``block // 2`` (for even blocks the square reaches one patch further after the centre)."""
    n_time, n_freq = grid
    after = block // 2  # patches covered after the centre, per axis
    before = block - 1 - after  # patches covered before it
    ct, cf = centres // n_freq, centres % n_freq  # [C]
    t = jnp.arange(n_time)[:, None, None]  # [T, 1, 1]
    f = jnp.arange(n_freq)[None, :, None]  # [1, F, 1]
    in_t = (t >= ct - before) & (t <= ct + after)  # [T, 1, C]
    in_f = (f >= cf - before) & (f <= cf + after)  # [1, F, C]
    return jnp.any(in_t & in_f, axis=-1).reshape(n_time * n_freq)  # [T·F]


def keep_exactly(preferred: Array, noise: Array, k: int) -> Array:
    """Sorted int32 [k] indices: a uniformly random subset of the ``preferred`` (bool [N]) patches if there
    are more than k of them, else all of them plus uniformly random others. ``noise`` uint32 [N] are random
    bits; the top k of the int32 score ``preferred · 2³⁰ + (noise >> 2)`` are kept."""
    score = (preferred.astype(jnp.int32) << 30) | (noise >> 2).astype(jnp.int32)  # [N] in [0, 2³¹)
    _, ids = jax.lax.top_k(score, k)  # [k]
    return jnp.sort(ids).astype(jnp.int32)


def draw_view_mask(
    key: Array, grid: tuple[int, int], mask_ratio: float, block: int, adjust: float
) -> BlockMask:
    """One view: ``mask`` bool [N], sorted ``ids_keep`` int32 [K]; N = T·F, K = int(N · (1 − mask_ratio))."""
    _check(grid, mask_ratio, block)
    n = grid[0] * grid[1]
    c = num_centres(n, mask_ratio, block, adjust)
    # One draw of random bits for the centres and the fill (one threefry call: much faster to compile than
    # randint + uniform). Centres are bits mod N: a bias of at most N / 2³² per index, negligible.
    bits = jax.random.bits(key, (c + n,), jnp.uint32)  # [C + N]
    centres = (bits[:c] % n).astype(jnp.int32)  # [C]
    ids_keep = keep_exactly(block_cover(centres, grid, block), bits[c:], num_kept(n, mask_ratio))  # [K]
    mask = jnp.ones((n,), jnp.bool_).at[ids_keep].set(False)  # [N]
    return BlockMask(mask, ids_keep)


def draw_clip_masks(
    key: Array, num_views: int, grid: tuple[int, int], mask_ratio: float, block: int, adjust: float
) -> BlockMask:
    """``num_views`` independent views of one clip: ``mask`` bool [V, N], ``ids_keep`` int32 [V, K]."""
    keys = jax.random.split(key, num_views)  # [V]
    return jax.vmap(lambda k: draw_view_mask(k, grid, mask_ratio, block, adjust))(keys)


def draw_batch_masks(
    key: Array,
    batch_size: int,
    num_views: int,
    grid: tuple[int, int],
    mask_ratio: float,
    block: int,
    adjust: float,
) -> BlockMask:
    """Masks for B clips × V views, flattened clip-major as the reference (``repeat_interleave``): row
    ``b · V + v`` is view v of clip b. ``mask`` bool [B·V, N], ``ids_keep`` int32 [B·V, K]."""
    keys = jax.random.split(key, batch_size)  # [B]
    out = jax.vmap(lambda k: draw_clip_masks(k, num_views, grid, mask_ratio, block, adjust))(keys)
    return BlockMask(*(x.reshape(batch_size * num_views, *x.shape[2:]) for x in out))
