"""Min / max pooling of token-prototype similarities with a sparse backward (CGP and ProtoBin heads).

    lo, hi = min_max_similarity(x, p)     # x [G, M, D] tokens, p [K, D] prototypes -> [G, K] each
    lo[g, k] = min_m x[g, m] · p[k],  hi[g, k] = max_m x[g, m] · p[k]

The forward is the dense similarity matrix [G, M, K] and its two reductions, as autodiff would run it. The
backward differs: autodiff scatters the output gradient into a dense [G, M, K] array (one non-zero per
pooled column) and multiplies it back through both operands, two more matmuls of the forward's size
(2·G·M·K·D flops each). Only the arg-min and arg-max token of each (g, k) receive gradient, so here

    dp[k]        = Σ_g  g_lo[g, k] · x[g, argmin_m] + g_hi[g, k] · x[g, argmax_m]       (row gathers)
    dx[g, m]     = Σ_k  [m = argmin] g_lo[g, k] · p[k] + [m = argmax] g_hi[g, k] · p[k]  (row scatter-adds)

G·K·D flops instead of 4·G·M·K·D, in chunks of g whose gathered rows stay under `CHUNK_BYTES`. With K = 10,000
prototypes (the paper's), the dense backward was two thirds of a CGP head's cost. Ties: the gradient goes
to the first arg-min / arg-max token (autodiff would share it among tied tokens; float similarities of
distinct tokens tie with probability ~0).

On CPU the forward runs in sequential chunks of g whose similarities stay in cache (`SIM_CHUNK_BYTES`), and
finds the arg-max as the first token equal to the max (plain reductions XLA:CPU vectorises; its variadic
arg-max reduction is several times slower): for the 16 × 512 tokens × 1,000 prototypes of the probe
benchmark, 20 ms instead of 51 ms for the similarities and both arg reductions (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from bat_jax.models import layers

Array = jax.Array

CHUNK_BYTES = 64 * 2**20  # gathered rows [chunk, K, D] per backward chunk
SIM_CHUNK_BYTES = 2 * 2**20  # similarities [chunk, M, K] per forward chunk on CPU (fits a core's L2)
AXES = ("batch", None, None)  # x [G, M, D]


def _similarities(x: Array, p: Array, precision) -> Array:
    return jnp.einsum("gmd,kd->gmk", x, p.astype(x.dtype), precision=precision)  # [G, M, K]


def _first_index(sim: Array, value: Array) -> Array:
    """The first m with sim[g, m, k] == value[g, k]: [G, K] int32 (arg-max / arg-min from the max / min)."""
    tokens = sim.shape[1]
    iota = jax.lax.broadcasted_iota(jnp.int32, sim.shape, 1)
    first = jnp.min(jnp.where(sim == value[:, None], iota, tokens), axis=1)
    return jnp.minimum(first, tokens - 1)  # a NaN column matches nothing: its last token


def _pool_rows(x: Array, p: Array, precision, with_min: bool, with_index: bool) -> tuple:
    """(lo, hi, i_lo, i_hi) of x [G, M, D] against p [K, D]; lo and i_lo None unless `with_min`, the
    indices None unless `with_index`. On CPU the arg tokens come from the max / min (`_first_index`);
    elsewhere from `jnp.argmax` / `jnp.argmin`, one pass over the similarities each (the same tokens)."""
    sim = _similarities(x, p, precision)  # [G, M, K]
    if with_index and not layers.on_cpu():
        i_hi = jnp.argmax(sim, axis=1)
        i_lo = jnp.argmin(sim, axis=1) if with_min else None
        pick = lambda i: jnp.take_along_axis(sim, i[:, None], axis=1)[:, 0]  # noqa: E731
        return (pick(i_lo) if with_min else None), pick(i_hi), i_lo, i_hi
    hi = jnp.max(sim, axis=1)
    lo = jnp.min(sim, axis=1) if with_min else None
    i_hi = _first_index(sim, hi) if with_index else None
    i_lo = _first_index(sim, lo) if with_index and with_min else None
    return lo, hi, i_lo, i_hi


def _pool(x: Array, p: Array, precision, with_min: bool, with_index: bool) -> tuple:
    """`_pool_rows` over all groups, in `layers.row_chunks` sequential chunks of groups (CPU)."""
    groups, tokens, _ = x.shape
    n = layers.row_chunks(groups, tokens * p.shape[0] * jnp.dtype(x.dtype).itemsize, SIM_CHUNK_BYTES)
    if n == 1:
        return _pool_rows(x, p, precision, with_min, with_index)
    out = jax.lax.map(
        lambda xc: _pool_rows(xc, p, precision, with_min, with_index), layers.split_rows(x, n, AXES)
    )
    return tuple(None if o is None else layers.merge_rows(o) for o in out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def min_max_similarity(x: Array, p: Array, precision=None, with_min: bool = True) -> tuple[Array, Array]:
    """x [G, M, D], p [K, D] → (min over m, max over m) of x·pᵀ, each [G, K] (min is zeros when not
    `with_min`: ProtoBin pools the maximum only)."""
    lo, hi, _, _ = _pool(x, p, precision, with_min, with_index=False)
    return (jnp.zeros_like(hi) if lo is None else lo), hi


def _fwd(x, p, precision, with_min):
    lo, hi, i_lo, i_hi = _pool(x, p, precision, with_min, with_index=True)
    return ((jnp.zeros_like(hi) if lo is None else lo), hi), (x, p, i_lo, i_hi)


def _chunk(groups: int, k: int, d: int, itemsize: int) -> int:
    """The largest divisor of `groups` whose gathered rows [chunk, K, D] fit in CHUNK_BYTES (at least 1)."""
    most = max(1, CHUNK_BYTES // max(1, k * d * itemsize))
    return max(c for c in range(1, min(groups, most) + 1) if groups % c == 0)


def _bwd(precision, with_min, res, grads):
    del precision
    x, p, i_lo, i_hi = res
    g_lo, g_hi = grads  # [G, K]
    groups, tokens, dim = x.shape
    pf = p.astype(jnp.float32)
    picks = [(i_hi, g_hi)] + ([(i_lo, g_lo)] if with_min else [])

    def one_chunk(args):
        xc, *idx_grad = args  # xc [c, M, D]; per pick: index [c, K], grad [c, K]
        dp = jnp.zeros(pf.shape, jnp.float32)
        dx = jnp.zeros(xc.shape, jnp.float32)
        rows = jnp.arange(xc.shape[0])[:, None]  # [c, 1]
        for index, grad in zip(idx_grad[0::2], idx_grad[1::2], strict=True):
            grad = grad.astype(jnp.float32)
            picked = xc[rows, index].astype(jnp.float32)  # [c, K, D]: the arg token of each (g, k)
            dp = dp + jnp.einsum("gk,gkd->kd", grad, picked)
            dx = dx.at[rows, index].add(grad[..., None] * pf[None])  # [c, K, D] into [c, M, D]
        return dp, dx

    c = _chunk(groups, p.shape[0], dim, 4)
    n = groups // c
    split = lambda a: a.reshape((n, c) + a.shape[1:])  # noqa: E731
    args = [split(x)] + [split(a) for pair in picks for a in pair]
    dp, dx = jax.lax.map(one_chunk, args)  # [n, K, D], [n, c, M, D]
    dx = dx.reshape((groups, tokens, dim)).astype(x.dtype)
    return dx, jnp.sum(dp, axis=0).astype(p.dtype)


min_max_similarity.defvjp(_fwd, _bwd)
