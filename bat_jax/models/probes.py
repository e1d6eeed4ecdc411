"""Probe heads on frozen encoder features: CGP and the baselines LCGP, H2T, LP and ProtoBin.

Every probe reads the encoder's per-block outputs (see ``bat_jax.models.encoder``):

* ``cls``     [L, B, D]        the CLS token after each of the L blocks,
* ``patches`` [L, B, T, F, D]  the patch tokens after each block (T time patches, F frequency patches),

and returns logits [B, C] (clip-level) or [B, T, C] (frame-wise, for sound event detection).
Usage::

    probe = make_probe("cgp", num_classes=527, num_layers=12, dim=768, num_prototypes=10_000)
    params = init_params(probe, jax.random.key(0))
    logits = probe.apply({"params": params}, out.cls, out.patches)          # eval: dropout off
    logits = probe.apply({"params": params}, out.cls, out.patches, deterministic=False,
                         rngs={"dropout": key})                                # training
    layer_gates(params)                                                        # [L] convex layer gate

Behaviour follows the official BAT code (``models/heads.py``), checked against its outputs in
tests/models/test_probes.py; ``convert/probes.py`` imports its weights.
Parameters carry logical axis names (``nn.with_logical_partitioning``) so large probes (K = 10,000
prototypes) can be sharded by a rules table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bat_jax.models.pooling import min_max_similarity

Array = jax.Array
DType = Any
PrecisionLike = Any

_WHERE = "bat_jax/models/probes.py"
NORM_EPS = 1e-12  # floor on the L2 norm, as torch.nn.functional.normalize
POOLINGS = ("cls", "patch_avg", "frame")

# Logical axis names of the parameters (mapped to mesh axes by the sharding rules in the config).
AXES_LAYERS = ("layers",)
AXES_PROTOTYPES = ("prototypes", "embed")
AXES_KERNEL = ("features", "classes")
AXES_BIAS = ("classes",)
AXES_NORM = ("features",)


# ----------------------------------------------------------------------------------------------------
# Pure building blocks


def l2_normalize(x: Array, axis: int = -1, eps: float = NORM_EPS) -> Array:
    """x / max(‖x‖₂, eps) along ``axis`` (torch's F.normalize); finite gradient at x = 0."""
    sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x / jnp.sqrt(jnp.maximum(sum_sq, eps * eps))


def gate_weights(gate_logits: Array) -> Array:
    """Convex layer weights α = softmax(a): α ≥ 0, Σ α = 1.  [L] -> [L]"""
    return jax.nn.softmax(gate_logits.astype(jnp.float32))


def mix_layers(weights: Array, x: Array) -> Array:
    """Σ_l w_l x_l over the leading layer axis.  w [L], x [L, ...] -> [...]"""
    w = weights.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.sum(w * x, axis=0)


def binarize_ste(x: Array) -> Array:
    """Sign (+1 where x ≥ 0, else −1) forward, identity gradient backward (straight-through estimator).

    Written as ``sign + (x − stop_gradient(x))`` so the forward value is exactly ±1.
    """
    sign = jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)
    return sign + (x - jax.lax.stop_gradient(x))


def min_mid_max(sim: Array, axes: tuple[int, ...], mid: Array | None = None) -> Array:
    """Per-prototype [min, mid, max] over token ``axes``; ``mid`` defaults to the mean.

    sim [..., K] -> [..., 3K] with the 3 statistics of each prototype adjacent (k0_min, k0_mid, k0_max,
    k1_min, ...): the column order of the reference's fc weight.
    """
    lo = jnp.min(sim, axis=axes)
    hi = jnp.max(sim, axis=axes)
    mid = jnp.mean(sim, axis=axes) if mid is None else mid
    return interleave_min_mid_max(lo, mid, hi)


def interleave_min_mid_max(lo: Array, mid: Array, hi: Array) -> Array:
    """[..., K] three times -> [..., 3K]: (k0_min, k0_mid, k0_max, k1_min, ...), the reference's fc order."""
    stacked = jnp.stack([lo, mid, hi], axis=-1)  # [..., K, 3]
    return stacked.reshape(stacked.shape[:-2] + (3 * stacked.shape[-2],))


def group_lasso_penalty(params: Mapping[str, Any], *, layer_dim: int | None = None) -> Array:
    """Head2Toe group-lasso penalty of the fc kernel [in, C] (reference: ``compute_group_lasso_penalty``).

    layer_dim None (reference default): one group per input feature, Σ_j ‖W_j,:‖₂ · √C.
    layer_dim = D ("layer-wise lasso"): one group per layer's D features, Σ_g ‖W_g + 1e-8‖_F · √D.
    The reference's ``group_scale`` buffer is this √(group size). Add ``lasso_weight * penalty`` to the loss.
    """
    kernel = _unbox_params(params)["fc"]["kernel"].astype(jnp.float32)  # [in, C]
    fan_in, num_classes = kernel.shape
    if layer_dim is None:
        return jnp.sum(_safe_norm(kernel, axis=(1,))) * math.sqrt(num_classes)
    if fan_in % layer_dim:
        raise ValueError(
            f"group_lasso_penalty ({_WHERE}): fc kernel has {fan_in} input features, expected a multiple "
            f"of layer_dim={layer_dim}"
        )
    groups = kernel.reshape(fan_in // layer_dim, layer_dim, num_classes) + 1e-8  # [L, D, C]
    return jnp.sum(_safe_norm(groups, axis=(1, 2))) * math.sqrt(layer_dim)


def _safe_norm(x: Array, axis: tuple[int, ...]) -> Array:
    """L2 norm with gradient 0 (not NaN) at the zero vector, as torch."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


# ----------------------------------------------------------------------------------------------------
# Initialisers (torch nn.Linear defaults, so a fresh probe starts like the reference's)


def _torch_linear_kernel_init() -> Callable:
    """U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with a=√5)."""
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_linear_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: DType = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ----------------------------------------------------------------------------------------------------
# Modules


class _Probe(nn.Module):
    """Shared fields and helpers (not a probe by itself)."""

    num_classes: int
    num_layers: int
    dim: int
    dropout_rate: float = 0.2
    dtype: DType = jnp.float32  # compute dtype; inputs (e.g. bf16 encoder outputs) are cast to it
    param_dtype: DType = jnp.float32
    precision: PrecisionLike = None  # matmul precision (e.g. "highest" for float32 parity on TPU)

    def _cls(self, cls: Array | None) -> Array:
        name = type(self).__name__
        if cls is None:
            raise ValueError(f"{name} ({_WHERE}): needs the CLS tokens [L, B, D], got None")
        if cls.ndim != 3 or cls.shape[0] != self.num_layers or cls.shape[-1] != self.dim:
            raise ValueError(
                f"{name} ({_WHERE}): expected cls [L={self.num_layers}, B, D={self.dim}], "
                f"found shape {tuple(cls.shape)}"
            )
        return jnp.asarray(cls, self.dtype)

    def _patches(self, patches: Array | None) -> Array:
        name = type(self).__name__
        if patches is None:
            raise ValueError(f"{name} ({_WHERE}): needs the patch tokens [L, B, T, F, D], got None")
        if patches.ndim != 5 or patches.shape[0] != self.num_layers or patches.shape[-1] != self.dim:
            raise ValueError(
                f"{name} ({_WHERE}): expected patches [L={self.num_layers}, B, T, F, D={self.dim}], "
                f"found shape {tuple(patches.shape)}"
            )
        return jnp.asarray(patches, self.dtype)

    def _check_pooling(self, pooling: str) -> None:
        if pooling not in POOLINGS:
            raise ValueError(
                f"{type(self).__name__} ({_WHERE}): pooling must be one of {POOLINGS}, found {pooling!r}"
            )

    def _gate_logits(self, init: Callable) -> Array:
        return self.param(
            "gate_logits",
            nn.with_logical_partitioning(init, AXES_LAYERS),
            (self.num_layers,),
            self.param_dtype,
        )

    def _prototypes(self, num_prototypes: int) -> Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), AXES_PROTOTYPES)
        return self.param("prototypes", init, (num_prototypes, self.dim), self.param_dtype)  # [K, D]

    def _norm(self, x: Array, use_norm: bool, eps: float) -> Array:
        if not use_norm:
            return x
        ln = nn.LayerNorm(
            epsilon=eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_fast_variance=False,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, AXES_NORM),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, AXES_NORM),
            name="ln",
        )
        return ln(x)

    def _classify(self, x: Array, deterministic: bool) -> Array:
        """dropout -> linear; logits in float32.  [..., in] -> [..., C]"""
        x = nn.Dropout(rate=self.dropout_rate, name="dropout")(x, deterministic=deterministic)
        fc = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(_torch_linear_kernel_init(), AXES_KERNEL),
            bias_init=nn.with_logical_partitioning(_torch_linear_bias_init(x.shape[-1]), AXES_BIAS),
            name="fc",
        )
        return fc(x).astype(jnp.float32)

    def _min_max(self, x: Array, prototypes_hat: Array, with_min: bool = True) -> tuple[Array, Array]:
        """Min and max over tokens of the cosine similarities, sparse backward (`pooling.min_max_similarity`):
        x [G, M, D] unit tokens, P̂ [K, D] → ([G, K], [G, K]), sharded over the batch and the prototypes."""
        lo, hi = min_max_similarity(
            x.astype(self.dtype), prototypes_hat.astype(self.dtype), self.precision, with_min
        )
        constrain = lambda a: nn.with_logical_constraint(a, ("batch", "prototypes"))  # noqa: E731
        return constrain(lo), constrain(hi)

    def _similarities(self, x: Array, prototypes_hat: Array) -> Array:
        """Cosine similarities of (unit) tokens with unit prototypes.  x [..., D], P̂ [K, D] -> [..., K]"""
        return jnp.einsum("...d,kd->...k", x, prototypes_hat.astype(self.dtype), precision=self.precision)


class ConvexGatedProbe(_Probe):
    """CGP (PAPER.md §1.2): convex layer gate over L2-normalised tokens, K shared prototypes,
    per-prototype [min, CLS, max] similarity pooling, dropout, linear.

    pooling="cls":       [min_N, CLS, max_N] over all patches -> logits [B, C]
    pooling="patch_avg": [min_N, mean_N, max_N] (no CLS)      -> logits [B, C]
    pooling="frame":     [min_F, mean_F, max_F] over the frequency patches of each time patch
                         -> logits [B, T, C] (sound event detection)
    The mixed tokens are not re-normalised after gating (as the reference).
    """

    num_prototypes: int = 10_000
    pooling: str = "cls"

    @nn.compact
    def __call__(self, cls: Array | None, patches: Array, *, deterministic: bool = True) -> Array:
        self._check_pooling(self.pooling)
        alpha = gate_weights(self._gate_logits(nn.initializers.ones))  # [L]
        prototypes_hat = l2_normalize(self._prototypes(self.num_prototypes))  # [K, D]

        z = mix_layers(alpha, l2_normalize(self._patches(patches)))  # [B, T, F, D]
        b, t, f, d = z.shape
        if self.pooling == "frame":  # per time patch, over its frequency patches
            lo, hi = self._min_max(z.reshape(b * t, f, d), prototypes_hat)  # [B·T, K]
            lo, hi = lo.reshape(b, t, -1), hi.reshape(b, t, -1)
            mid = self._similarities(jnp.mean(z, axis=2), prototypes_hat)  # mean_F(z)·P̂ = mean_F(z·P̂)
        else:
            lo, hi = self._min_max(z.reshape(b, t * f, d), prototypes_hat)  # [B, K]
            if self.pooling == "patch_avg":
                mid = self._similarities(jnp.mean(z, axis=(1, 2)), prototypes_hat)
            else:
                o = mix_layers(alpha, l2_normalize(self._cls(cls)))  # [B, D]
                mid = self._similarities(o, prototypes_hat)
        return self._classify(interleave_min_mid_max(lo, mid, hi), deterministic)


class _TokenProbe(_Probe):
    """Fields of the token (non-prototype) probes LCGP, H2T and LP."""

    pooling: str = "cls"  # "cls", "patch_avg" (mean patch token) or "frame" (frequency-mean per time patch)
    use_norm: bool = True  # LayerNorm before the linear layer (the reference configs' head_norm: true)
    norm_eps: float = 1e-6


class LinearGatedProbe(_TokenProbe):
    """LCGP: convex (softmax) mix of the raw, un-normalised CLS tokens across layers (gate logits init 0),
    optional LayerNorm, dropout, linear. pooling="patch_avg" mixes each layer's mean patch token instead;
    pooling="frame" each layer's frequency-mean patch token per time patch (logits [B, T, C])."""

    @nn.compact
    def __call__(
        self, cls: Array | None, patches: Array | None = None, *, deterministic: bool = True
    ) -> Array:
        self._check_pooling(self.pooling)
        alpha = gate_weights(self._gate_logits(nn.initializers.zeros))  # [L]
        x = _layer_tokens(self, self.pooling, cls, patches)  # [L, B, D] or [L, B, T, D]
        x = mix_layers(alpha, x)  # [B, D] or [B, T, D]
        return self._classify(self._norm(x, self.use_norm, self.norm_eps), deterministic)


class Head2ToeProbe(_TokenProbe):
    """H2T: all layers' CLS tokens concatenated layer-major ([B, L·D]), optional LayerNorm, dropout, linear.
    Train with ``group_lasso_penalty``. pooling "patch_avg" / "frame" as in LinearGatedProbe."""

    @nn.compact
    def __call__(
        self, cls: Array | None, patches: Array | None = None, *, deterministic: bool = True
    ) -> Array:
        self._check_pooling(self.pooling)
        x = _layer_tokens(self, self.pooling, cls, patches)  # [L, B, D] or [L, B, T, D]
        x = jnp.moveaxis(x, 0, -2)  # [B, L, D] or [B, T, L, D]
        x = x.reshape(x.shape[:-2] + (self.num_layers * self.dim,))  # [B, L·D] or [B, T, L·D]
        return self._classify(self._norm(x, self.use_norm, self.norm_eps), deterministic)


class LinearProbe(_TokenProbe):
    """LP: the last layer's CLS token, optional LayerNorm, dropout, linear. pooling "patch_avg" uses the
    last layer's mean patch token, "frame" its frequency-mean patch token per time patch."""

    @nn.compact
    def __call__(
        self, cls: Array | None, patches: Array | None = None, *, deterministic: bool = True
    ) -> Array:
        self._check_pooling(self.pooling)
        x = _layer_tokens(self, self.pooling, cls, patches)[-1]  # [B, D] or [B, T, D]
        return self._classify(self._norm(x, self.use_norm, self.norm_eps), deterministic)


class ProtoBinProbe(_Probe):
    """ProtoBin (PB): last-layer patch tokens, K prototypes binarised to ±1 (straight-through gradient),
    cosine similarity, max over all patches (or over the frequency patches of each time patch when
    frame_wise: logits [B, T, C]), dropout, linear."""

    num_prototypes: int = 10_000
    frame_wise: bool = False

    @nn.compact
    def __call__(self, cls: Array | None, patches: Array, *, deterministic: bool = True) -> Array:
        del cls  # PB reads the patch tokens only
        prototypes_hat = l2_normalize(binarize_ste(self._prototypes(self.num_prototypes)))  # [K, D]
        x = l2_normalize(self._patches(patches)[-1])  # [B, T, F, D]
        b, t, f, d = x.shape
        groups, tokens = (b * t, f) if self.frame_wise else (b, t * f)
        _, hi = self._min_max(x.reshape(groups, tokens, d), prototypes_hat, with_min=False)
        feats = hi.reshape(b, t, -1) if self.frame_wise else hi  # [B, T, K] or [B, K]
        return self._classify(feats, deterministic)


def _layer_tokens(probe: _Probe, pooling: str, cls: Array | None, patches: Array | None) -> Array:
    """One token per layer (and per time patch when frame-wise): [L, B, D] or [L, B, T, D]."""
    if pooling == "cls":
        return probe._cls(cls)
    x = probe._patches(patches)  # [L, B, T, F, D]
    return jnp.mean(x, axis=(2, 3) if pooling == "patch_avg" else 3)


# ----------------------------------------------------------------------------------------------------
# Factory, initialisation, gates, weight import

_REGISTRY: dict[str, tuple[type[_Probe], dict[str, Any]]] = {
    "cgp": (ConvexGatedProbe, {"pooling": "cls"}),
    "cgp_patch_avg": (ConvexGatedProbe, {"pooling": "patch_avg"}),
    "cgp_frame": (ConvexGatedProbe, {"pooling": "frame"}),
    "lcgp": (LinearGatedProbe, {}),
    "h2t": (Head2ToeProbe, {}),
    "lp": (LinearProbe, {}),
    "protobin": (ProtoBinProbe, {}),
}
PROBE_NAMES = tuple(_REGISTRY)


def make_probe(name: str, num_classes: int, num_layers: int, dim: int, **kw: Any) -> _Probe:
    """Build a probe by name: "cgp", "cgp_patch_avg", "cgp_frame", "lcgp", "h2t", "lp", "protobin".

    Extra keyword arguments set module fields (num_prototypes, dropout_rate, pooling, use_norm, norm_eps,
    frame_wise, dtype, param_dtype, precision).
    """
    if name not in _REGISTRY:
        raise ValueError(f"make_probe ({_WHERE}): unknown probe {name!r}, expected one of {PROBE_NAMES}")
    cls, preset = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise TypeError(
            f"make_probe ({_WHERE}): {name!r} has no field(s) {unknown}; fields: {sorted(fields)}"
        )
    return cls(num_classes=num_classes, num_layers=num_layers, dim=dim, **{**preset, **kw})


def dummy_inputs(probe: _Probe, batch: int = 1, time_patches: int = 1, freq_patches: int = 8) -> tuple:
    """Zero (cls [L, B, D], patches [L, B, T, F, D]) of the probe's sizes, for init / eval_shape."""
    cls = jnp.zeros((probe.num_layers, batch, probe.dim), probe.dtype)
    patches = jnp.zeros((probe.num_layers, batch, time_patches, freq_patches, probe.dim), probe.dtype)
    return cls, patches


def init_params(probe: _Probe, rng: Array) -> dict[str, Any]:
    """Fresh parameters (the inner "params" dict), boxed with their logical axis names (``nn.Partitioned``,
    for ``nn.get_partition_spec`` / ``nn.logical_to_mesh_sharding``), as every ``init_params`` in
    bat_jax.models; ``bat_jax.models.unbox`` gives plain arrays."""
    variables = jax.jit(probe.init)(rng, *dummy_inputs(probe))
    return variables["params"]


def param_logical_axes(probe: _Probe) -> dict[str, Any]:
    """PartitionSpec of logical axis names for every parameter (no arrays are allocated)."""
    boxed = jax.eval_shape(lambda k: probe.init(k, *dummy_inputs(probe)), jax.random.key(0))
    return nn.get_partition_spec(boxed)["params"]


def _unbox_params(params: Mapping[str, Any]) -> Mapping[str, Any]:
    params = nn.unbox(params)
    return params["params"] if "params" in params else params


def layer_gates(params: Mapping[str, Any]) -> Array:
    """Convex layer gate α = softmax(gate_logits) [L] of a CGP / LCGP probe (params or {"params": ...})."""
    p = _unbox_params(params)
    if "gate_logits" not in p:
        raise KeyError(
            f"layer_gates ({_WHERE}): expected 'gate_logits' in the probe params (CGP, LCGP), "
            f"found keys {sorted(p)}"
        )
    return gate_weights(p["gate_logits"])
