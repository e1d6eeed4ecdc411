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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array

CHUNK_BYTES = 64 * 2**20  # gathered rows [chunk, K, D] per backward chunk


def _similarities(x: Array, p: Array, precision) -> Array:
    return jnp.einsum("gmd,kd->gmk", x, p.astype(x.dtype), precision=precision)  # [G, M, K]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def min_max_similarity(x: Array, p: Array, precision=None, with_min: bool = True) -> tuple[Array, Array]:
    """x [G, M, D], p [K, D] → (min over m, max over m) of x·pᵀ, each [G, K] (min is zeros when not
    `with_min`: ProtoBin pools the maximum only)."""
    sim = _similarities(x, p, precision)
    hi = jnp.max(sim, axis=1)
    return (jnp.min(sim, axis=1) if with_min else jnp.zeros_like(hi)), hi


def _fwd(x, p, precision, with_min):
    sim = _similarities(x, p, precision)  # [G, M, K]
    i_hi = jnp.argmax(sim, axis=1)  # [G, K]
    hi = jnp.take_along_axis(sim, i_hi[:, None], axis=1)[:, 0]
    if with_min:
        i_lo = jnp.argmin(sim, axis=1)
        lo = jnp.take_along_axis(sim, i_lo[:, None], axis=1)[:, 0]
    else:
        i_lo, lo = None, jnp.zeros_like(hi)
    return (lo, hi), (x, p, i_lo, i_hi)


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
