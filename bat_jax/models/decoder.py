"""BAT's ViT decoder for masked latent regression (PAPER.md §2.2), a pure-functional Flax Linen module.

The student encoder sees only the K kept patches of each view; the decoder predicts the teacher targets
at every one of the N patch positions:

    pred = VitDecoder(cfg).apply({"params": p}, tokens, ids_keep)   # [R, K, D_in], [R, K] → [R, N, D_in]
    pred = VitDecoder(cfg).apply({"params": p}, tokens, ids_keep, ids_masked)   # [R, M]: → [R, M, D_in]

1. an optional input projection D_in → D (no bias; only when the decoder width D differs from D_in);
2. a [R, N, D] sequence filled with the learned mask token, the kept tokens scattered back to their
   positions ``ids_keep`` (static shapes: one scatter, no padding);
3. a trainable position table added to every token (kept and mask), initialised with the 2-D sin-cos
   table of the ``(F', T')`` grid, as the reference decoder (the same layout as BAT's encoder table);
4. ``depth`` post-norm gated blocks (no final norm: the last block ends in its LayerNorm);
5. an output projection D → D_in without bias.

With ``ids_masked`` [R, M] the last block computes only those positions' outputs (their queries attend to
all N tokens) and the predictions are [R, M, D_in], equal to the full output's rows at ``ids_masked``: the
SSL loss reads the masked patches only, so the last block's other rows are work nobody reads.

No CLS token enters the decoder.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bat_jax.models.config import REMAT_FULL, REMAT_NONE
from bat_jax.models.encoder import block_class
from bat_jax.models.layers import ACT_TOKENS, Linear, partitioned, sincos_2d

Array = jax.Array
_WHERE = "bat_jax/models/decoder.py"
MASK_TOKEN_INIT_STD = 0.02


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Architecture of the ViT decoder, built by ``SSLConfig.decoder`` from the SSL config (the recipe's
    numbers: ``ssl.decoder_*`` in configs/pretrain/bat_base.py)."""

    in_dim: int  # width of the encoder tokens it reads and of the predictions it writes
    depth: int
    num_heads: int
    mlp_ratio: float
    use_gate: bool
    eps: float  # LayerNorm epsilon
    grid: tuple[int, int]  # token grid (time patches, frequency patches); tokens time-major
    dim: int | None = None  # decoder width; None: in_dim (no input projection)
    qkv_bias: bool = True
    remat_policy: str = REMAT_NONE  # "none", "full" or a jax.checkpoint_policies name
    dtype: str = "float32"  # computation dtype
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))
        problems = []
        if min(self.width, self.depth, self.num_heads, self.in_dim) <= 0:
            problems.append(
                f"in_dim, dim, depth, num_heads must be positive, got {self.in_dim}, {self.width}, "
                f"{self.depth}, {self.num_heads}"
            )
        elif self.width % self.num_heads:
            problems.append(f"dim {self.width} must be divisible by num_heads {self.num_heads}")
        if self.width % 4:
            problems.append(f"dim {self.width} must be a multiple of 4 for the 2-D sin-cos positions")
        if len(self.grid) != 2 or min(self.grid) < 1:
            problems.append(f"grid must be (time patches, freq patches), both >= 1, got {self.grid}")
        if self.remat_policy not in (REMAT_NONE, REMAT_FULL) and not hasattr(
            jax.checkpoint_policies, self.remat_policy
        ):
            problems.append(
                f"remat_policy must be 'none', 'full' or a jax.checkpoint_policies name, got "
                f"{self.remat_policy!r}"
            )
        if problems:
            raise ValueError(f"invalid DecoderConfig ({_WHERE}): " + "; ".join(problems))

    @property
    def width(self) -> int:
        """The decoder's token width D (``dim``, or ``in_dim`` when ``dim`` is None)."""
        return self.in_dim if self.dim is None else self.dim

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def pos_init_grid(self) -> tuple[int, int]:
        """Layout of the sin-cos table the positions start from: (F', T'), as the reference decoder."""
        return (self.grid[1], self.grid[0])


class VitDecoder(nn.Module):
    """Kept encoder tokens [R, K, D_in] + their indices [R, K] → predictions at all N patches [R, N, D_in]."""

    config: DecoderConfig

    def setup(self):
        cfg = self.config
        d = cfg.width
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kinds = dict(dtype=dtype, param_dtype=param_dtype)
        table = sincos_2d(d, cfg.pos_init_grid)  # [N, D] numpy
        self.pos_embed = self.param(
            "pos_embed",
            partitioned(lambda _, shape, dtype: jnp.asarray(table, dtype), (None, "embed")),
            table.shape,
            param_dtype,
        )
        self.mask_token = self.param(
            "mask_token",
            partitioned(nn.initializers.normal(MASK_TOKEN_INIT_STD), ("embed",)),
            (d,),
            param_dtype,
        )
        if d != cfg.in_dim:
            self.in_proj = Linear(
                (cfg.in_dim,), (d,), ("embed", None), use_bias=False, name="in_proj", **kinds
            )
        block = block_class(cfg.remat_policy)
        self.blocks = [
            block(
                dim=d,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                use_gate=cfg.use_gate,
                layer_norm_first=False,
                eps=cfg.eps,
                **kinds,
            )
            for _ in range(cfg.depth)
        ]
        self.out_proj = Linear((d,), (cfg.in_dim,), (None, "embed"), use_bias=False, name="out_proj", **kinds)

    def __call__(self, tokens: Array, ids_keep: Array, ids_masked: Array | None = None) -> Array:
        """[R, K, D_in], [R, K] → [R, N, D_in]; with ``ids_masked`` [R, M]: [R, M, D_in] (module doc)."""
        cfg = self.config
        rows, kept = ids_keep.shape
        if tokens.ndim != 3 or tokens.shape[:2] != (rows, kept) or tokens.shape[2] != cfg.in_dim:
            raise ValueError(
                f"VitDecoder ({_WHERE}): expected tokens [{rows}, {kept}, {cfg.in_dim}] for ids_keep "
                f"{tuple(ids_keep.shape)}, found {tuple(tokens.shape)}"
            )
        dtype = jnp.dtype(cfg.dtype)
        x = tokens.astype(dtype)
        if cfg.width != cfg.in_dim:
            x = self.in_proj(x)  # [R, K, D]
        mask_tokens = jnp.broadcast_to(self.mask_token.astype(dtype), (cfg.num_patches, cfg.width))  # [N, D]
        # A scatter batched over rows (shards with the batch): kept tokens overwrite their mask tokens.
        x = jax.vmap(lambda row, idx: mask_tokens.at[idx].set(row, unique_indices=True))(x, ids_keep)
        x = x + self.pos_embed.astype(dtype)  # [R, N, D]
        x = nn.with_logical_constraint(x, ACT_TOKENS)
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.blocks[-1](x, ids_masked)  # [R, N, D], or [R, M, D] at ids_masked
        return self.out_proj(x)  # [R, N or M, D_in]


def init_decoder_params(config: DecoderConfig, rng: Array) -> dict[str, Any]:
    """Random (boxed) decoder parameters; `bat_jax.models.encoder.unbox` gives plain arrays."""
    kept = 1
    tokens = jnp.zeros((1, kept, config.in_dim), jnp.dtype(config.dtype))
    return VitDecoder(config).init(rng, tokens, jnp.zeros((1, kept), jnp.int32))["params"]
