"""The BAT / EAT ViT audio encoder as a pure-functional Flax Linen module, and a small user-facing wrapper.

`BatEncoder(config)` maps a log-mel spectrogram [B, T, n_mels] (T a multiple of the patch length, 16)
to every block's output:

    out = BatEncoder(cfg).apply({"params": params}, spec)
    out.cls      # [L, B, D]                 CLS token after each block (averaged over chunks)
    out.patches  # [L, B, T/16, n_mels/16, D] patch tokens after each block (chunks concatenated)

Forward, as the reference `ViT.extract_features_with_patch_tokens`:
1. 16×16 conv patch embedding → [B, T/16, 8, D]; tokens flattened time-major (index t·8 + f).
2. The time axis is split into chunks of `chunk_time_patches` (64) patches; a last, shorter chunk is
   kept as is. Each chunk is encoded on its own: its tokens get the first n entries of the fixed
   sin-cos table (every chunk starts at position 0), its own CLS token (no position) is prepended,
   then `pre_norm` and the L blocks.
3. CLS outputs are averaged over chunks (each chunk weighs the same, a short last one included);
   patch tokens are concatenated along time.

Blocks are a Python loop over depth rather than `nn.scan`: every block's output is needed anyway
(CGP reads all layers), per-block parameter names (`blocks_0`, ...) mirror the PyTorch checkpoints so
weight import stays a plain key map, and regex rules on parameter paths (layer-wise lr decay, frozen
layers) keep working. jit compiles the loop once; `remat_policy` trades memory for recompute.

`FrozenEncoder` wraps a config and (unboxed) params: `enc(spec)` jits the apply once per input shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models import xla_options
from bat_jax.models.config import REMAT_FULL, REMAT_NONE, EncoderConfig
from bat_jax.models.layers import ACT_TOKENS, Block, layer_norm, partitioned, sincos_2d, zeros

Array = jax.Array
_WHERE = "bat_jax/models/encoder.py"
CLS_INIT_STD = 0.02


class EncoderOutput(NamedTuple):
    """Every block's outputs: `cls` [L, B, D], `patches` [L, B, T', F', D] (T' time, F' frequency patches)."""

    cls: Array
    patches: Array


def block_class(remat_policy: str) -> type[nn.Module]:
    """`Block`, wrapped in `nn.remat` with the named policy unless `remat_policy` is "none"."""
    if remat_policy == REMAT_NONE:
        return Block
    policy = None if remat_policy == REMAT_FULL else getattr(jax.checkpoint_policies, remat_policy)
    return nn.remat(Block, policy=policy)


def check_spec_shape(shape: tuple[int, ...], config: EncoderConfig) -> None:
    """Raise ValueError unless `shape` is [B, T, n_mels] with T a positive multiple of the patch length."""
    frames = config.patch_size[0]
    if len(shape) != 3 or shape[2] != config.n_mels or shape[1] <= 0 or shape[1] % frames:
        raise ValueError(
            f"encoder input must be a log-mel spectrogram [batch, frames, {config.n_mels}] with frames a "
            f"positive multiple of {frames}; got shape {tuple(shape)} ({_WHERE}). Pad or crop the time axis."
        )


class BatEncoder(nn.Module):
    """ViT encoder with (optionally gated) attention over 16×16 spectrogram patches."""

    config: EncoderConfig

    def setup(self):
        cfg = self.config
        dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # Xavier over the flattened [patch area, D] matrix (MAE/EAT convention for the patch projection).
        conv_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        self.patch_embed = nn.Conv(
            cfg.dim,
            kernel_size=cfg.patch_size,
            strides=cfg.patch_size,
            padding="VALID",
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=partitioned(conv_init, (None, None, None, "embed")),
            bias_init=partitioned(zeros(), ("embed",)),
        )
        self.cls_token = self.param(
            "cls_token",
            partitioned(nn.initializers.normal(CLS_INIT_STD), ("embed",)),
            (cfg.dim,),
            param_dtype,
        )
        if cfg.pre_norm:
            self.pre_norm = layer_norm(cfg.eps, dtype, param_dtype, name="pre_norm")
        block = block_class(cfg.remat_policy)
        self.blocks = [
            block(
                dim=cfg.dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                use_gate=cfg.use_gate,
                layer_norm_first=cfg.layer_norm_first,
                eps=cfg.eps,
                dtype=dtype,
                param_dtype=param_dtype,
            )
            for _ in range(cfg.depth)
        ]

    # ------------------------------------------------------------------------------------------------
    # Pieces (usable with `apply(..., method=...)`, e.g. by the masked SSL student)

    def embed_patches(self, spec: Array) -> Array:
        """[B, T, n_mels] → patch tokens without positions [B, T/16, n_mels/16, D]."""
        check_spec_shape(spec.shape, self.config)
        x = spec.astype(jnp.dtype(self.config.dtype))[..., None]  # [B, T, F, 1] (NHWC)
        return self.patch_embed(x)  # [B, T', F', D]

    def positions(self, num_tokens: int) -> Array:
        """The first `num_tokens` entries of the fixed sin-cos table: [num_tokens, D] (a constant)."""
        cfg = self.config
        if num_tokens > cfg.max_positions:
            raise ValueError(
                f"{num_tokens} tokens need more positions than the sin-cos grid {cfg.pos_grid} holds "
                f"({cfg.max_positions}); long inputs are encoded in chunks of {cfg.chunk_time_patches} time "
                "patches"
            )
        return jnp.asarray(sincos_2d(cfg.dim, cfg.pos_grid)[:num_tokens], jnp.dtype(cfg.dtype))

    def encode_sequence(self, x: Array, every_layer: bool = True) -> Array:
        """Tokens with positions [B, N, D] → every block's output [L, B, 1 + N, D] (CLS first); without
        `every_layer` the last block's only, [1, B, 1 + N, D]."""
        batch = x.shape[0]
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (batch, 1, self.config.dim))  # [B, 1, D]
        x = jnp.concatenate([cls, x], axis=1)  # [B, 1 + N, D]
        if self.config.pre_norm:
            x = self.pre_norm(x)
        x = nn.with_logical_constraint(x, ACT_TOKENS)
        return self.run_blocks(x, every_layer)

    def run_blocks(self, x: Array, every_layer: bool = True) -> Array:
        """[B, N, D] → every block's output [L, B, N, D] (the last one only, [1, B, N, D], without
        `every_layer`): a Python loop over the blocks, or with
        `scan_blocks` one `jax.lax.scan` of a block over their parameters stacked on the fly (the parameter
        tree keeps its `blocks_i` layout for checkpoints, conversion and the EMA teacher; the stack is a copy
        per call, its gradient a slice). The loop runs at init and when intermediates are captured (the
        teacher's per-block MLP outputs), which need the bound blocks."""
        cfg = self.config
        if not cfg.scan_blocks or self.is_initializing() or self.is_mutable_collection("intermediates"):
            hidden = []
            for block in self.blocks:
                x = block(x)
                hidden.append(x)
            return jnp.stack(hidden if every_layer else hidden[-1:])  # [L or 1, B, N, D]
        params = self.variables["params"]
        stacked = jax.tree.map(lambda *p: jnp.stack(p), *(params[f"blocks_{i}"] for i in range(cfg.depth)))
        block = self.blocks[0].clone(parent=None, name=None)  # unbound: applied to each block's params

        def body(h: Array, block_params: Any) -> tuple[Array, Array | None]:
            h = block.apply({"params": block_params}, h)
            return h, (h if every_layer else None)

        last, hidden = jax.lax.scan(body, x, stacked)
        return hidden if every_layer else last[None]  # [L or 1, B, N, D]

    def encode_chunk(self, tokens: Array) -> EncoderOutput:
        """Patch tokens of one chunk [b, t, F', D] (t ≤ chunk) → cls [L, b, D], patches [L, b, t, F', D]."""
        b, t, f, d = tokens.shape
        x = tokens.reshape(b, t * f, d) + self.positions(t * f)  # time-major: index = t·F' + f
        hidden = self.encode_sequence(x)  # [L, b, 1 + t·F', D]
        return EncoderOutput(hidden[:, :, 0], hidden[:, :, 1:].reshape(-1, b, t, f, d))

    # ------------------------------------------------------------------------------------------------

    def __call__(self, spec: Array) -> EncoderOutput:
        """[B, T, n_mels] → EncoderOutput(cls [L, B, D], patches [L, B, T/16, n_mels/16, D])."""
        tokens = self.embed_patches(spec)  # [B, T', F', D]
        batch, time, freq, dim = tokens.shape
        chunk = self.config.chunk_time_patches
        n_full, rest = divmod(time, chunk)
        cls_sum, patch_parts = None, []
        if n_full:  # equal-size chunks are folded into the batch: [B·n, chunk, F', D]
            full = tokens[:, : n_full * chunk].reshape(batch * n_full, chunk, freq, dim)
            out = self.encode_chunk(full)
            cls_sum = out.cls.reshape(-1, batch, n_full, dim).sum(axis=2)  # [L, B, D]
            patch_parts.append(out.patches.reshape(-1, batch, n_full * chunk, freq, dim))
        if rest:  # a last, shorter chunk
            out = self.encode_chunk(tokens[:, n_full * chunk :])
            cls_sum = out.cls if cls_sum is None else cls_sum + out.cls
            patch_parts.append(out.patches)
        cls = cls_sum / (n_full + (rest > 0))  # [L, B, D]
        patches = patch_parts[0] if len(patch_parts) == 1 else jnp.concatenate(patch_parts, axis=2)
        return EncoderOutput(cls, patches)


# ----------------------------------------------------------------------------------------------------
# Parameters


@functools.lru_cache(maxsize=32)
def _jitted_init(config: EncoderConfig) -> Callable[[Array], dict[str, Any]]:
    shape = (1, config.patch_size[0], config.n_mels)  # one time patch; params do not depend on T

    def init(key: Array) -> dict[str, Any]:
        return BatEncoder(config).init(key, jnp.zeros(shape, jnp.dtype(config.dtype)))["params"]

    return jax.jit(init)


def init_params(config: EncoderConfig, rng: Array) -> dict[str, Any]:
    """Random parameters (boxed with logical axis names: `nn.LogicallyPartitioned`). See `unbox`.

    Works without a mesh, and inside `jax.jit(..., out_shardings=...)` under a mesh + logical rules.
    """
    return _jitted_init(config)(rng)


def abstract_params(config: EncoderConfig) -> dict[str, Any]:
    """Shapes and dtypes of the (boxed) parameters, without allocating them."""
    return jax.eval_shape(lambda rng: init_params(config, rng), jax.random.key(0))


def unbox(params: Any) -> Any:
    """Plain arrays from boxed (`nn.LogicallyPartitioned`) parameters; plain parameters pass through."""
    return nn.meta.unbox(params)


def logical_axes(params: Any) -> Any:
    """The logical axis names of boxed parameters, as a pytree of `PartitionSpec`s."""
    return nn.get_partition_spec(params)


def param_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(unbox(params))))


# ----------------------------------------------------------------------------------------------------
# User-facing wrapper


@functools.lru_cache(maxsize=32)
def jitted_apply(config: EncoderConfig) -> Callable[[Any, Array], EncoderOutput]:
    """`jit(params, spec) -> EncoderOutput` for `config`, shared by every `FrozenEncoder` with an equal
    config (compiled with `xla_options.inference` for its dtype: on CPU a float32 forward without YNNPACK
    fusions, faster there)."""
    module = BatEncoder(config)
    return jax.jit(
        lambda params, spec: module.apply({"params": params}, spec),
        compiler_options=xla_options.inference(encoder_dtype=config.dtype),
    )


@dataclasses.dataclass(eq=False)
class FrozenEncoder:
    """A frozen encoder: `config` + plain `params`; `enc(spec)` → EncoderOutput.

    `spec` is numpy or jax, [B, T, n_mels] or [T, n_mels] (a batch of one is added), T a multiple of 16.
    The jitted apply is kept on the instance (and shared between encoders with equal configs); it
    compiles once per input shape.
    """

    config: EncoderConfig
    params: Any

    def __post_init__(self):
        self.params = jax.tree.map(jnp.asarray, unbox(self.params))  # on the device once, not per call
        self.module = BatEncoder(self.config)
        self._forward = jitted_apply(self.config)

    @classmethod
    def random(cls, config: EncoderConfig, seed: int = 0, *, rng: Array | None = None) -> FrozenEncoder:
        """An encoder with random (initial) weights, from `rng` or else `jax.random.key(seed)`."""
        return cls(config, init_params(config, jax.random.key(seed) if rng is None else rng))

    @property
    def num_layers(self) -> int:
        return self.config.depth

    def __call__(self, spec: Any) -> EncoderOutput:
        spec = jnp.asarray(spec, jnp.dtype(self.config.dtype))
        if spec.ndim == 2:
            spec = spec[None]  # [T, F] → [1, T, F]
        check_spec_shape(spec.shape, self.config)
        return self._forward(self.params, spec)

    def cache_size(self) -> int:
        """How many input shapes the jitted apply has been compiled for."""
        return self._forward._cache_size()
