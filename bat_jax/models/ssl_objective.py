"""BAT's self-supervised objective (PAPER.md §2.4): masked student + ViT decoder, EMA teacher, two losses.

    loss, metrics = bat_ssl_loss(params, teacher_params, spec, key, config)

``params = {"encoder": …, "decoder": …}`` are the student's (trainable) parameters, ``teacher_params`` the
EMA copy of the student encoder's, ``spec`` [B, T, F] a batch of log-mel clips. One call:

1. draws V inverse block masks per clip on device (``bat_jax.models.masking``): rows clip-major, K kept
   patches per view (102 of 512 for BAT);
2. student: patch-embeds each clip once, adds the fixed sin-cos positions, gathers the K kept tokens of each
   view, prepends CLS, applies ``pre_norm`` and the encoder blocks (as the reference's masked student:
   positions before the gather, pre-norm after the CLS concat) → final CLS [B·V, D] and kept tokens;
3. decoder: kept tokens scattered among mask tokens → predictions at the M = N − K masked patches
   [B·V, M, D] (its last block computes only those rows; ``student_forward`` without ``ids_masked`` gives
   all N);
4. teacher (under ``stop_gradient``): the encoder on the full clip, once per clip; every block's patch
   outputs [L, B, N, D] (``target="eob"``, BAT) or every block's MLP output before the residual add
   (``target="ffn"``, data2vec 2.0 / EAT) → ``ssl_targets`` [B, N, D];
5. ``ssl_losses``: global (CLS vs token-mean target) + local (masked patches) MSE, in float32.

Teacher arrays keep one row per clip; nothing is repeated V times except the kept tokens the student needs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bat_jax.models.config import EncoderConfig
from bat_jax.models.decoder import DecoderConfig, VitDecoder, init_decoder_params
from bat_jax.models.encoder import BatEncoder
from bat_jax.models.encoder import init_params as init_encoder_params
from bat_jax.models.layers import Mlp
from bat_jax.models.masking import draw_batch_masks
from bat_jax.models.ssl_losses import pred_var, ssl_losses, ssl_targets, target_var

Array = jax.Array
PyTree = Any
_WHERE = "bat_jax/models/ssl_objective.py"

TARGET_EOB = "eob"  # end-of-block outputs (BAT)
TARGET_FFN = "ffn"  # MLP outputs before the residual add (data2vec 2.0 / EAT)
TARGETS = (TARGET_EOB, TARGET_FFN)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SSLConfig:
    """Every number of the pretraining objective, all required: the values live in the config files
    (configs/pretrain/bat_base.py is the paper's recipe; ``bat_jax.train.config.ssl_config`` builds this).
    Hashable: a static argument of the jitted step."""

    encoder: EncoderConfig
    frames: int  # spectrogram frames per clip (T): the config's top-level `frames`, the loader's too
    num_views: int  # masked views per clip (V)
    mask_ratio: float
    mask_block: int  # inverse block masking: block side in patches
    mask_adjust: float  # extra keep ratio when drawing block centres
    decoder_depth: int
    decoder_heads: int
    decoder_mlp_ratio: float
    global_weight: float
    local_weight: float
    target: str  # "eob" (BAT) or "ffn" (data2vec 2.0 / EAT)
    target_eps: float  # eps inside both target norms
    instance_norm_targets: bool
    layer_norm_targets: bool
    ema_start: float  # EMA decay at step 0 ...
    ema_end: float  # ... ramped linearly to this one ...
    ema_warmup_steps: int  # ... over this many updates
    decoder_dim: int | None = None  # None: the decoder runs at the encoder width
    decoder_remat_policy: str | None = None  # None: the encoder's remat policy

    def __post_init__(self):
        problems = []
        patch_t = self.encoder.patch_size[0]
        if self.frames <= 0 or self.frames % patch_t:
            problems.append(f"frames must be a positive multiple of {patch_t}, got {self.frames}")
        elif self.num_patches > self.encoder.max_positions:
            problems.append(
                f"{self.frames} frames give {self.num_patches} patches, more than the encoder's sin-cos "
                f"table {self.encoder.pos_grid} holds ({self.encoder.max_positions})"
            )
        if self.num_views < 1:
            problems.append(f"num_views must be >= 1, got {self.num_views}")
        if self.target not in TARGETS:
            problems.append(f"target must be one of {TARGETS}, got {self.target!r}")
        if problems:
            raise ValueError(f"invalid SSLConfig ({_WHERE}): " + "; ".join(problems))
        _ = self.decoder  # validates the decoder's numbers too

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (time patches T', frequency patches F') of one clip; tokens are time-major."""
        return (self.frames // self.encoder.patch_size[0], self.encoder.freq_patches)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def decoder(self) -> DecoderConfig:
        enc = self.encoder
        return DecoderConfig(
            in_dim=enc.dim,
            dim=self.decoder_dim,
            depth=self.decoder_depth,
            num_heads=self.decoder_heads,
            mlp_ratio=self.decoder_mlp_ratio,
            use_gate=enc.use_gate,
            eps=enc.eps,
            grid=self.grid,
            remat_policy=enc.remat_policy if self.decoder_remat_policy is None else self.decoder_remat_policy,
            dtype=enc.dtype,
            param_dtype=enc.param_dtype,
        )

    def replace(self, **changes: Any) -> SSLConfig:
        return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------
# Parameters


@functools.lru_cache(maxsize=16)
def _jitted_init(config: SSLConfig) -> Callable[[Array], dict[str, Any]]:
    def init(rng: Array) -> dict[str, Any]:
        enc_key, dec_key = jax.random.split(rng)
        return {
            "encoder": init_encoder_params(config.encoder, enc_key),
            "decoder": init_decoder_params(config.decoder, dec_key),
        }

    return jax.jit(init)  # one compilation for both networks


def init_params(config: SSLConfig, rng: Array) -> dict[str, Any]:
    """Random student parameters ``{"encoder", "decoder"}``, boxed with logical axis names (see `unbox`).
    Works inside ``jax.jit(..., out_shardings=...)`` under a mesh and logical rules, as the encoder's."""
    return _jitted_init(config)(rng)


def abstract_params(config: SSLConfig) -> dict[str, Any]:
    """Shapes and dtypes of the (boxed) student parameters, without allocating or compiling anything."""
    return jax.eval_shape(_jitted_init(config), jax.random.key(0))


# ----------------------------------------------------------------------------------------------------
# Networks (functions of a bound BatEncoder, run with `apply(..., method=...)`)


def _tokens_with_positions(module: BatEncoder, spec: Array) -> Array:
    """[B, T, F] → patch tokens + fixed positions [B, N, D] (time-major, the first N sin-cos entries)."""
    tokens = module.embed_patches(spec)  # [B, T', F', D]
    b, t, f, d = tokens.shape
    return tokens.reshape(b, t * f, d) + module.positions(t * f)  # [B, N, D]


def _masked_student(module: BatEncoder, spec: Array, ids_keep: Array, num_views: int) -> tuple[Array, Array]:
    """Final CLS [B·V, D] and kept patch tokens [B·V, K, D] of every masked view."""
    x = _tokens_with_positions(module, spec)  # [B, N, D]
    b, _, d = x.shape
    ids = ids_keep.reshape(b, num_views, -1)  # [B, V, K] (rows are clip-major)
    # A gather batched over clips (shards with the batch): each clip's tokens are read by its V views.
    x = jax.vmap(lambda tokens, idx: tokens[idx])(x, ids)  # [B, V, K, D]
    last = module.encode_sequence(x.reshape(b * num_views, -1, d), every_layer=False)[0]  # [B·V, 1 + K, D]
    return last[:, 0], last[:, 1:]


def _teacher_layers(module: BatEncoder, spec: Array) -> Array:
    """Every block's patch outputs on the full clip: [L, B, N, D] (CLS dropped)."""
    return module.encode_sequence(_tokens_with_positions(module, spec))[:, :, 1:]


def _is_mlp(module: Any, method_name: str) -> bool:
    return isinstance(module, Mlp) and method_name == "__call__"


def student_forward(
    params: PyTree, spec: Array, ids_keep: Array, config: SSLConfig, ids_masked: Array | None = None
) -> tuple[Array, Array]:
    """Student encoder on the kept patches + decoder: CLS [B·V, D], predictions [B·V, N, D]; with
    ``ids_masked`` [B·V, M] the predictions at those patches only, [B·V, M, D] (the same values)."""
    cls, kept = BatEncoder(config.encoder).apply(
        {"params": params["encoder"]}, spec, ids_keep, config.num_views, method=_masked_student
    )
    pred = VitDecoder(config.decoder).apply({"params": params["decoder"]}, kept, ids_keep, ids_masked)
    return cls, pred


def masked_ids(mask: Array, num_masked: int) -> Array:
    """The masked patch indices of each row, ascending: ``mask`` [R, N] bool with ``num_masked`` True per row
    → int32 [R, num_masked]."""
    return jnp.argsort(~mask, axis=1, stable=True)[:, :num_masked].astype(jnp.int32)


def teacher_layer_outputs(teacher_params: PyTree, spec: Array, config: SSLConfig) -> Array:
    """The teacher's per-layer target features [L, B, N, D]: end-of-block outputs or MLP outputs."""
    module = BatEncoder(config.encoder)
    variables = {"params": teacher_params}
    if config.target == TARGET_EOB:
        return module.apply(variables, spec, method=_teacher_layers)
    _, state = module.apply(
        variables, spec, method=_teacher_layers, capture_intermediates=_is_mlp, mutable=["intermediates"]
    )
    inter = state["intermediates"]
    ffn = [inter[f"blocks_{i}"]["mlp"]["__call__"][0] for i in range(config.encoder.depth)]  # [B, 1 + N, D]
    return jnp.stack(ffn)[:, :, 1:]  # [L, B, N, D]


def teacher_targets(teacher_params: PyTree, spec: Array, config: SSLConfig) -> Array:
    """Normalised, layer-averaged teacher targets [B, N, D] (float32, no gradient)."""
    layers = teacher_layer_outputs(jax.lax.stop_gradient(teacher_params), spec, config)
    targets = ssl_targets(
        layers,
        config.target_eps,
        instance_norm=config.instance_norm_targets,
        layer_norm=config.layer_norm_targets,
    )
    return jax.lax.stop_gradient(targets)


# ----------------------------------------------------------------------------------------------------
# Loss


def check_batch(spec: Array, config: SSLConfig) -> None:
    expected = (config.frames, config.encoder.n_mels)
    if spec.ndim != 3 or tuple(spec.shape[1:]) != expected:
        raise ValueError(
            f"bat_ssl_loss ({_WHERE}): expected spec [batch, {expected[0]}, {expected[1]}] "
            f"(SSLConfig.frames, n_mels), found {tuple(spec.shape)}"
        )


def bat_ssl_loss_with_masks(
    params: PyTree,
    teacher_params: PyTree,
    spec: Array,
    mask: Array,
    ids_keep: Array,
    config: SSLConfig,
    *,
    moments: bool = False,
) -> tuple[Array, dict[str, Array]]:
    """The objective for given masks: ``mask`` [B·V, N] (True = masked), ``ids_keep`` [B·V, K] sorted,
    rows clip-major. Returns (loss float32, metrics {loss, global_loss, local_loss, target_var, pred_var});
    ``moments=True``: target_var / pred_var as `ssl_losses.feature_moments` (count, mean, sum of squared
    deviations), which merge exactly over micro-batches (train/step.py)."""
    check_batch(spec, config)
    rows = spec.shape[0] * config.num_views
    if mask.shape != (rows, config.num_patches) or ids_keep.ndim != 2 or ids_keep.shape[0] != rows:
        raise ValueError(
            f"bat_ssl_loss ({_WHERE}): expected mask [{rows}, {config.num_patches}] and ids_keep [{rows}, K] "
            f"for {spec.shape[0]} clips x {config.num_views} views, found {tuple(mask.shape)}, "
            f"{tuple(ids_keep.shape)}"
        )
    targets = teacher_targets(teacher_params, spec, config)  # [B, N, D]
    ids_masked = masked_ids(mask, config.num_patches - ids_keep.shape[1])  # [B·V, M]
    cls, pred = student_forward(params, spec, ids_keep, config, ids_masked)  # [B·V, D], [B·V, M, D]
    metrics = ssl_losses(
        pred, cls, targets, mask, config.num_views, config.global_weight, config.local_weight, ids_masked
    )
    metrics["target_var"] = target_var(targets, moments=moments)
    metrics["pred_var"] = pred_var(jax.lax.stop_gradient(pred), None, moments=moments)
    return metrics["loss"], metrics


def draw_student_masks(key: Array, batch_size: int, config: SSLConfig) -> tuple[Array, Array]:
    """``masking.draw_batch_masks`` with the config's numbers: ``batch_size`` clips × V views, mask
    [B·V, N] bool, ids_keep [B·V, K] int32 (rows clip-major)."""
    out = draw_batch_masks(
        key,
        batch_size,
        config.num_views,
        config.grid,
        config.mask_ratio,
        config.mask_block,
        config.mask_adjust,
    )
    return out.mask, out.ids_keep


def bat_ssl_loss(
    params: PyTree, teacher_params: PyTree, spec: Array, key: Array, config: SSLConfig
) -> tuple[Array, dict[str, Array]]:
    """BAT's pretraining objective on ``spec`` [B, T, F], masks drawn on device from ``key``.

    Returns (loss float32, metrics {loss, global_loss, local_loss, target_var, pred_var}); differentiate
    with respect to ``params`` (the teacher is under stop_gradient). ``spec`` is checked (`check_batch`)
    by `bat_ssl_loss_with_masks`."""
    mask, ids_keep = draw_student_masks(key, spec.shape[0], config)
    return bat_ssl_loss_with_masks(params, teacher_params, spec, mask, ids_keep, config)
