"""Transformer building blocks shared by the encoder and the SSL decoder.

* `sincos_2d`       — the fixed 2-D sin-cos position table (numpy, float32).
* `GatedAttention`  — multi-head self-attention with BAT's sigmoid output gate:
                      O = (σ(x W_G + b_G) ⊙ softmax(QKᵀ/√d_h) V) W_O.
* `Mlp`             — Linear → GELU (exact) → Linear.
* `Block`           — post-norm (x ← LN₁(x + Attn(x)); x ← LN₂(x + MLP(x))) or pre-norm block.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and key activations a
logical sharding constraint; a rules table maps the names to mesh axes. The names used:
``embed`` (model width D), ``mlp`` (MLP hidden width), ``qkv`` (the 3 of q, k, v), ``heads``,
``kv`` (head width), and for activations ``batch`` and ``length``. Weights are Xavier-uniform
(fan-in/fan-out of the equivalent 2-D matrix, as PyTorch's `nn.Linear`), biases zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any

# Logical axis names of activations.
ACT_TOKENS = ("batch", "length", "embed")  # [B, N, D]
ACT_HEADS = ("batch", "length", "heads", "kv")  # [B, N, H, Dh]
ACT_MLP = ("batch", "length", "mlp")  # [B, N, M]

SINCOS_BASE = 10000.0


def partitioned(init: Any, names: tuple[str | None, ...]) -> Any:
    """An initializer whose result is boxed with logical axis names."""
    return nn.with_logical_partitioning(init, names)


def xavier_uniform() -> Any:
    return nn.initializers.xavier_uniform()


def zeros() -> Any:
    return nn.initializers.zeros_init()


def ones() -> Any:
    return nn.initializers.ones_init()


# ----------------------------------------------------------------------------------------------------
# Fixed positions


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """[M] positions → [M, dim]: sin of pos·ω_k in the first half, cos in the second, ω_k = base^(−2k/dim)."""
    omega = 1.0 / SINCOS_BASE ** (np.arange(dim // 2, dtype=np.float32) / np.float32(dim / 2))  # [dim/2]
    angles = np.outer(pos.reshape(-1).astype(np.float32), omega.astype(np.float32))  # [M, dim/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def sincos_2d(dim: int, grid: tuple[int, int]) -> np.ndarray:
    """The 2-D sin-cos table of a (rows, cols) grid flattened row-major: [rows·cols, dim] float32.

    Row-major index r·cols + c; the first dim/2 channels encode the column c, the last dim/2 the row r
    (the MAE / BAT / EAT convention). Which token gets which entry is decided by the caller: BAT slices
    the first n entries of the (8, 64) grid for n time-major tokens (see `config.POS_GRID_BAT`).
    """
    if dim % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {dim}")
    rows, cols = grid
    col, row = np.meshgrid(
        np.arange(cols, dtype=np.float32), np.arange(rows, dtype=np.float32)
    )  # [rows, cols]
    return np.concatenate([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], axis=1)


# ----------------------------------------------------------------------------------------------------
# Modules


def layer_norm(eps: float, dtype: DType, param_dtype: DType, name: str) -> nn.LayerNorm:
    """LayerNorm over the last axis with the exact (two-pass) variance, as PyTorch."""
    return nn.LayerNorm(
        epsilon=eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=partitioned(ones(), ("embed",)),
        bias_init=partitioned(zeros(), ("embed",)),
        name=name,
    )


class Linear(nn.Module):
    """y = x·W + b contracting the last len(in_shape) axes of x; kernel [*in_shape, *out_shape].

    Xavier-uniform with fan-in = prod(in_shape), fan-out = prod(out_shape) (PyTorch's nn.Linear + xavier),
    created directly in its multi-axis shape so the logical names fit it (under a mesh too). In bfloat16 the
    products accumulate in float32, the bias is added in float32 and the sum rounded to bf16 once (autocast's
    matmul; XLA:CPU then runs the dot in YNNPACK's bf16 kernels, about twice its bf16-output speed).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    use_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [..., *in_shape] → [..., *out_shape]
        n_in, n_out = len(self.in_shape), len(self.out_shape)
        init = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)), out_axis=tuple(range(n_in, n_in + n_out))
        )
        kernel = self.param(
            "kernel", partitioned(init, self.kernel_axes), self.in_shape + self.out_shape, self.param_dtype
        )
        acc = jnp.promote_types(self.dtype, jnp.float32)
        y = jnp.tensordot(
            x.astype(self.dtype), kernel.astype(self.dtype), axes=n_in, preferred_element_type=acc
        )
        if self.use_bias:
            bias_init = partitioned(zeros(), self.kernel_axes[n_in:])
            y = y + self.param("bias", bias_init, self.out_shape, self.param_dtype).astype(acc)
        return y.astype(self.dtype)


def gelu_exact(x: Array) -> Array:
    """GELU, exact form x·Φ(x) = ½·x·(1 + erf(x/√2)), as torch's nn.GELU(); via erf, not erfc: XLA's CPU
    erf is a short rational polynomial, erfc a select-heavy exp form (≈ 3× slower at [64·512, 768])."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))


# Attention on CPU runs in sequential chunks of rows whose [rows, H, N, N] score block stays near this size
# (per device; it fits the last-level cache of a CPU): measured on a 2-core CPU at the decoder's shapes
# (64 rows x 3 heads x 512 tokens) forward + backward took 0.64x the CPU time of all rows at once (see
# benchmarks/RESULTS.md). Other backends run all rows at once.
ATTENTION_CHUNK_BYTES = 8 * 2**20


def on_cpu() -> bool:
    """Whether the CPU-only code paths apply (row chunks, keys-major attention scores, the pooling's arg
    tokens): JAX's default backend is the CPU. The one place that decides, for all of them."""
    return jax.default_backend() == "cpu"


def row_chunks(rows: int, row_bytes: int, budget: int) -> int:
    """How many sequential chunks of a batch of `rows` rows (each ``row_bytes`` of temporaries) a CPU
    computation runs in: 1 off CPU, else the fewest chunks (dividing each device's rows, so that
    `split_rows`' chunks keep their rows on their devices) whose temporaries are at most `budget` bytes;
    one row a chunk when a row alone is over it."""
    if not on_cpu():
        return 1
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh.empty else mesh.size
    if rows % devices:
        return 1
    local = rows // devices  # rows per device when the batch is split over every device (the most)
    for n in range(1, local):
        if local % n == 0 and (local // n) * row_bytes <= budget:
            return n
    return local


def attention_chunks(batch: int, heads: int, tokens: int, itemsize: int, kv_tokens: int | None = None) -> int:
    """How many sequential chunks of rows `attention` uses for q [batch, tokens, heads, ·] and k, v with
    ``kv_tokens`` (default ``tokens``): `row_chunks` with a row's [heads, tokens, kv_tokens] scores against
    `ATTENTION_CHUNK_BYTES`."""
    per_row = heads * tokens * (tokens if kv_tokens is None else kv_tokens) * itemsize  # one row's scores
    return row_chunks(batch, per_row, ATTENTION_CHUNK_BYTES)


def _scores_axes() -> str:
    """The axis order of the [B, H, ·, ·] scores and probabilities: keys before queries on CPU ("bhkq"), where
    the softmax's reductions over the keys then run across the query lanes (XLA:CPU's reductions over the
    minor axis are 2-4x slower: `benchmarks/RESULTS.md`), queries first elsewhere ("bhqk", the layout fused
    softmax kernels expect)."""
    return "bhkq" if on_cpu() else "bhqk"


def _probs(q: Array, k: Array, m: Array | None = None) -> tuple[Array, Array, Array]:
    """q, k [B, N, H, Dh] → unnormalised probabilities e = exp(s − m) of the head-major scores s = q kᵀ/√Dh
    ([B, H, N, N] in `_scores_axes` order), the row max m [B, H, N] over the keys (computed unless given: the
    backward's recompute) and the row sum l [B, H, N] of e. The scores, their max, exp and its sum are float32
    whatever q's dtype; e is rounded to q's dtype (l sums the unrounded e, as autocast's float32 softmax)."""
    sc = _scores_axes()
    keys = sc.index("k")
    scale = np.float32(1.0 / np.sqrt(q.shape[-1])).astype(q.dtype)
    s = jnp.einsum(f"bqhd,bkhd->{sc}", q * scale, k, preferred_element_type=jnp.float32)
    m = jax.lax.stop_gradient(jnp.max(s, axis=keys)) if m is None else m  # [B, H, N]
    e = jnp.exp(s - jnp.expand_dims(m, keys))
    return e.astype(q.dtype), m, jnp.sum(e, axis=keys)


def _attn_rows(q: Array, k: Array, v: Array) -> tuple[Array, Array, Array, Array]:
    """Forward: out [B, N, H, Dh], e, row max m and 1 / row sum inv_l [B, H, N]. The softmax is left
    unnormalised; the division by the row sum is done on the [N, Dh] output, not on the [N, N] e."""
    sc = _scores_axes()
    e, m, row_sum = _probs(q, k)
    inv_l = (1.0 / row_sum).astype(q.dtype)  # [B, H, N]
    out = jnp.einsum(f"{sc},bkhd->bqhd", e, v, preferred_element_type=jnp.float32)  # [B, N, H, Dh]
    out = (out * jnp.swapaxes(inv_l, 1, 2)[..., None]).astype(q.dtype)
    return out, e, m, inv_l


def _attn_rows_bwd(q, k, v, e, inv_l, out, d_out) -> tuple[Array, Array, Array]:
    """Backward from e: rowsum(dP ⊙ P) = rowsum(dO ⊙ O) ([N, Dh] instead of [N, N]) and one fused
    elementwise pass dS = e ⊙ (dP − δ) / l over the scores."""
    sc = _scores_axes()
    keys = sc.index("k")
    scale = np.float32(1.0 / np.sqrt(q.shape[-1])).astype(q.dtype)
    inv = jnp.swapaxes(inv_l, 1, 2)[..., None]  # [B, N, H, 1]
    d_v = jnp.einsum(f"{sc},bqhd->bkhd", e, d_out * inv)  # [B, N, H, Dh]
    delta = jnp.swapaxes(jnp.sum(d_out * out, axis=-1), 1, 2)  # [B, H, N]
    d_p = jnp.einsum(f"bqhd,bkhd->{sc}", d_out, v)
    d_s = e * (d_p - jnp.expand_dims(delta, keys)) * jnp.expand_dims(inv_l, keys)
    d_q = jnp.einsum(f"{sc},bkhd->bqhd", d_s, k) * scale
    d_k = jnp.einsum(f"{sc},bqhd->bkhd", d_s, q * scale)
    return d_q, d_k, d_v


def split_rows(x: Array, n: int, axes: tuple[str | None, ...] = ACT_HEADS) -> Array:
    """[B, ...] → [n, B/n, ...], chunk i = rows i, i + n, i + 2n, ... (strided: a batch split over devices in
    contiguous blocks keeps each chunk's rows on their devices); `axes`: the logical axes of x (default
    attention's [B, N, H, Dh])."""
    x = jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)  # [n, B/n, ...]
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return nn.with_logical_constraint(x, (None, *axes))


def merge_rows(x: Array) -> Array:
    """Inverse of `split_rows`: [n, B/n, ...] → [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _attn_forward(q: Array, k: Array, v: Array) -> tuple[Array, tuple[Array, ...]]:
    """q, k, v [B, N, H, Dh] → softmax(q kᵀ/√Dh) v [B, N, H, Dh], and the backward's residuals: all rows at
    once (e kept for the backward), or in `attention_chunks` sequential chunks of rows (only the row max
    and sum kept: the backward recomputes e chunk by chunk, as flash attention)."""
    b, tokens, heads, _ = q.shape
    n = attention_chunks(b, heads, tokens, jnp.dtype(q.dtype).itemsize, kv_tokens=k.shape[1])
    if n == 1:
        out, e, _, inv_l = _attn_rows(q, k, v)
        return out, (q, k, v, e, inv_l, out)
    qkv = tuple(split_rows(x, n) for x in (q, k, v))  # [n, B/n, N, H, Dh] each

    def rows(x: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        out, _, m, inv_l = _attn_rows(*x)
        return out, m, inv_l

    out, m, inv_l = jax.lax.map(rows, qkv)
    return merge_rows(out), (*qkv, m, inv_l, out)


@jax.custom_vjp
def attention(q: Array, k: Array, v: Array) -> Array:
    """Multi-head softmax attention, q [B, M, H, Dh], k, v [B, N, H, Dh] → [B, M, H, Dh] (M = N for
    self-attention; fewer queries when only some tokens' outputs are needed), with a custom VJP (see
    `_attn_rows_bwd`). The [B, H, N, N] scores are materialised for all rows at once (as the reference),
    except on CPU, where the rows run in chunks whose scores stay in cache (`attention_chunks`)."""
    return _attn_forward(q, k, v)[0]


def _attn_bwd(res: tuple[Array, ...], d_out: Array) -> tuple[Array, Array, Array]:
    if res[0].ndim == 4:  # all rows at once: (q, k, v, e, inv_l, out); chunked: q [n, B/n, N, H, Dh]
        return _attn_rows_bwd(*res, d_out)
    q, k, v, m, inv_l, out = res  # chunked, [n, B/n, ...] each

    def rows(x: tuple[Array, ...]) -> tuple[Array, Array, Array]:
        q, k, v, m, inv_l, out, d_out = x
        return _attn_rows_bwd(q, k, v, _probs(q, k, m)[0], inv_l, out, d_out)

    grads = jax.lax.map(rows, (q, k, v, m, inv_l, out, split_rows(d_out, q.shape[0])))
    return tuple(merge_rows(g) for g in grads)


attention.defvjp(_attn_forward, _attn_bwd)


def take_rows(x: Array, rows: Array) -> Array:
    """x [B, N, ...] → [B, M, ...]: the tokens ``rows`` [B, M] (int) of each batch row."""
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


class GatedAttention(nn.Module):
    """Multi-head self-attention; with `use_gate`, head outputs are gated by σ(x W_G + b_G) before W_O.
    With ``rows`` [B, M], only those tokens' outputs [B, M, D] are computed (their queries attend to all N
    keys and values): the same values as the full output's rows. With ``kv_start`` = Q > 0, the first Q tokens
    only ask: every token's query attends to the keys and values of tokens Q: only (VQT's query tokens)."""

    dim: int
    num_heads: int
    qkv_bias: bool = True
    use_gate: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, rows: Array | None = None, kv_start: int = 0
    ) -> Array:  # x: [B, N, D] → [B, N or M, D]
        d, heads, head_dim = self.dim, self.num_heads, self.dim // self.num_heads
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv = Linear(
            (d,), (3, heads, head_dim), ("embed", "qkv", "heads", "kv"), self.qkv_bias, name="qkv", **kinds
        )
        qkv = qkv(x)  # [B, N, 3, H, Dh]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh] each
        if kv_start:  # nobody attends to the first kv_start tokens
            k, v = k[:, kv_start:], v[:, kv_start:]  # [B, N - kv_start, H, Dh]
        if rows is not None:  # only these queries (and their gates)
            q, x = take_rows(q, rows), take_rows(x, rows)  # [B, M, H, Dh], [B, M, D]
        out = attention(q, k, v)  # softmax(q kᵀ / √Dh) v: [B, N or M, H, Dh]
        if self.use_gate:
            gate = Linear((d,), (heads, head_dim), ("embed", "heads", "kv"), name="gate", **kinds)
            out = out * jax.nn.sigmoid(gate(x))  # [B, N, H, Dh]
        out = nn.with_logical_constraint(out, ACT_HEADS)
        proj = Linear((heads, head_dim), (d,), ("heads", "kv", "embed"), name="proj", **kinds)
        return proj(out)  # [B, N, D]


class Mlp(nn.Module):
    """fc1 → GELU (exact erf form) → fc2."""

    dim: int
    hidden_dim: int
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:  # x: [B, N, D]
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Linear((self.dim,), (self.hidden_dim,), ("embed", "mlp"), name="fc1", **kinds)(x)  # [B, N, M]
        h = nn.with_logical_constraint(gelu_exact(h), ACT_MLP)
        return Linear((self.hidden_dim,), (self.dim,), ("mlp", "embed"), name="fc2", **kinds)(h)  # [B, N, D]


class Block(nn.Module):
    """Transformer block with (gated) attention.

    Post-norm (`layer_norm_first=False`, BAT/EAT/data2vec 2.0):  x ← LN₁(x + Attn(x)); x ← LN₂(x + MLP(x)).
    Pre-norm  (`layer_norm_first=True`):                          x ← x + Attn(LN₁(x)); x ← x + MLP(LN₂(x)).
    The gate reads the attention's own input (x in post-norm, LN₁(x) in pre-norm). With ``rows`` [B, M]
    (int), only those tokens' outputs [B, M, D] are computed, attending to all N tokens (a last block whose
    other outputs nobody reads). With ``prefix`` [B, Q, D], the Q tokens are prepended as queries only: they
    attend to x's N tokens but no token attends to them, so x's outputs are unchanged; the output is
    [B, Q + N, D], prefix rows first (VQT's query tokens, see `bat_jax.models.vqt`). Not with ``rows``.
    """

    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_gate: bool = True
    layer_norm_first: bool = False
    eps: float = 1e-6
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(
        self, x: Array, rows: Array | None = None, prefix: Array | None = None
    ) -> Array:  # x: [B, N, D] → [B, N or M or Q + N, D]
        kinds = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm1 = layer_norm(self.eps, name="norm1", **kinds)
        norm2 = layer_norm(self.eps, name="norm2", **kinds)
        attn = GatedAttention(self.dim, self.num_heads, self.qkv_bias, self.use_gate, name="attn", **kinds)
        mlp = Mlp(self.dim, int(self.dim * self.mlp_ratio), name="mlp", **kinds)
        kv_start = 0
        if prefix is not None:  # a static count (the prefix's shape): fine under nn.remat too
            if rows is not None:
                raise ValueError("Block (bat_jax/models/layers.py): pass rows or prefix, not both")
            kv_start = prefix.shape[1]
            x = jnp.concatenate([prefix.astype(x.dtype), x], axis=1)  # [B, Q + N, D]
        residual = x if rows is None else take_rows(x, rows)  # [B, N or M, D]
        if self.layer_norm_first:
            x = residual + attn(norm1(x), rows, kv_start)
            x = x + mlp(norm2(x))
        else:
            x = norm1(residual + attn(x, rows, kv_start))
            x = norm2(x + mlp(x))
        return nn.with_logical_constraint(x, ACT_TOKENS)
