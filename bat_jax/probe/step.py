"""One jitted step for every probe of a run: one frozen encoder forward per batch feeds them all.

    state = init_state(heads, tx, members)            # params {name: tree}, each leaf [S, ...]
    forward = encoder_forward(encoder_config)             # (params, spec) → (cls, patches), no gradient
    state, losses = jit_train_step(forward, heads, tx, loss, cfg)(state, encoder_params, batch)
    logits = jit_eval_step(forward, heads)(state.params, encoder_params, batch)   # {name: [S, B, C]}

S is the number of sweep members (learning rates × seeds, 1 without a sweep): the probes' parameters and
optimizer states carry a leading member axis and the update is `jax.vmap`ped over it, while the encoder runs
once per batch outside the vmap; `peak_lr` [S] is each member's peak learning rate. The encoder's parameters
are an argument (never in the optimizer) and its outputs go through `jax.lax.stop_gradient`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bat_jax.models import xla_options
from bat_jax.models.config import EncoderConfig
from bat_jax.models.encoder import BatEncoder
from bat_jax.models.probes import init_params
from bat_jax.models.vqt import VQTProbe, init_vqt_params, vqt_logits
from bat_jax.probe import heads as heads_lib

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class ProbeState:
    """``step`` int32 [] (completed updates); ``params`` {probe: tree} and ``opt_state`` with a leading
    member axis [S]; ``peak_lr`` float32 [S]; ``rng`` [S] dropout keys (one per member, from its seed)."""

    step: Array
    params: PyTree
    opt_state: PyTree
    peak_lr: Array
    rng: Array


def init_params_of(heads: Mapping[str, nn.Module], key: Array) -> dict[str, PyTree]:
    """Fresh plain (unboxed) params {name: tree} of the probes, probe i from fold_in(key, i)."""
    out = {}
    for i, (name, head) in enumerate(heads.items()):
        rng = jax.random.fold_in(key, i)
        if isinstance(head, VQTProbe):
            out[name] = nn.unbox(init_vqt_params(head, rng))
        elif isinstance(head, heads_lib.PerLayerLinearProbe):
            cls = jnp.zeros((head.num_layers, 1, head.dim), jnp.float32)
            out[name] = jax.jit(head.init)(rng, cls)["params"]
        else:
            out[name] = nn.unbox(init_params(head, rng))
    return out


def head_logits(head, params, cls, patches, encoder_params, spec, *, deterministic=True, rng=None) -> Array:
    """One probe's logits: from the shared frozen outputs (cls, patches), or, for VQT, from its own encoder
    forward with query tokens (the encoder's outputs are unchanged by them; the gradient stops at its
    parameters)."""
    rngs = None if deterministic or rng is None else {"dropout": rng}
    if isinstance(head, VQTProbe):
        return vqt_logits(head, params, encoder_params, spec, deterministic=deterministic, rng=rng)
    return head.apply({"params": params}, cls, patches, deterministic=deterministic, rngs=rngs)


def init_state(
    heads: Mapping[str, nn.Module], tx: optax.GradientTransformation, members: list[dict[str, Any]]
) -> ProbeState:
    """Step 0: member m's probes initialised from its seed (members of equal seeds start equal)."""
    seeds = jnp.asarray([m["seed"] for m in members], jnp.uint32)
    init_keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.key(0), s))(seeds)
    params = jax.vmap(lambda k: init_params_of(heads, k))(init_keys)
    opt_state = jax.vmap(tx.init)(params)
    rng = jax.vmap(lambda k: jax.random.fold_in(k, 1 << 20))(init_keys)  # dropout stream, apart from init
    peak = jnp.asarray([m["peak_lr"] for m in members], jnp.float32)
    return ProbeState(jnp.zeros((), jnp.int32), params, opt_state, peak, rng)


def encoder_forward(config: EncoderConfig) -> Callable[[PyTree, Array], tuple[Array, Array]]:
    """(encoder params, spec [B, T, F]) → (cls [L, B, D], patches [L, B, T', F', D]), without gradient."""
    module = BatEncoder(config)

    def forward(params: PyTree, spec: Array) -> tuple[Array, Array]:
        out = module.apply({"params": params}, spec.astype(jnp.dtype(config.dtype)))
        return jax.lax.stop_gradient(out.cls), jax.lax.stop_gradient(out.patches)

    return forward


def frame_mask(num_frames: Array, num_patches: int, patch_frames: int) -> Array:
    """bool [B, T']: time patch t of a clip holds audio (t · patch_frames < its num_frames), not padding."""
    return jnp.arange(num_patches)[None, :] * patch_frames < num_frames[:, None]


def _head_loss(
    heads: Mapping[str, nn.Module],
    loss: Callable[[Array, Array], Array],
    lasso_weight: float,
    frame_loss: Callable[[Array, Array], Array] | None = None,
) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """The summed loss of every probe (and each one's part). Clip-level probes: `loss` of logits [B, C] vs
    "labels", averaged over the valid rows; frame-wise probes (`heads.FRAME_WISE`): `frame_loss` of logits
    [B, T', C] vs "frame_labels", averaged over the time patches that hold audio of the valid rows."""

    def total(params, cls, patches, encoder_params, spec, targets, key):
        parts = {}
        weights = targets["valid"].astype(jnp.float32)  # [B]
        for i, (name, head) in enumerate(heads.items()):
            rng = jax.random.fold_in(key, i)
            logits = head_logits(
                head, params[name], cls, patches, encoder_params, spec, deterministic=False, rng=rng
            )
            if name in heads_lib.FRAME_WISE:  # [B, T', C] against the frame targets
                w = weights[:, None] * targets["frame_valid"].astype(jnp.float32)
                value = jnp.sum(frame_loss(logits, targets["frame_labels"]) * w) / jnp.maximum(
                    jnp.sum(w), 1.0
                )
            else:
                y = targets["labels"]
                if logits.ndim == y.ndim + 1:  # per-layer probes [L, B, C]: each layer's loss, summed
                    per_example = jnp.sum(loss(logits, jnp.broadcast_to(y, logits.shape)), axis=0)
                else:
                    per_example = loss(logits, y)  # [B]
                value = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
            parts[name] = value + heads_lib.regularizer(name, params[name], lasso_weight)
        return sum(parts.values()), parts

    return total


def batch_targets(
    batch: Mapping[str, Array], heads: Mapping[str, Any], patch_frames: int
) -> dict[str, Array]:
    """What the losses read from a batch: "labels", "valid" [B] (all True when the batch has none) and, when a
    frame-wise probe is among `heads`, "frame_labels" [B, T', C] and "frame_valid" [B, T']."""
    labels = batch["labels"]
    out = {"labels": labels, "valid": batch.get("valid", jnp.ones(labels.shape[:1], bool))}
    if any(name in heads_lib.FRAME_WISE for name in heads):
        frame_labels = batch["frame_labels"]
        out["frame_labels"] = frame_labels
        out["frame_valid"] = frame_mask(batch["num_frames"], frame_labels.shape[1], patch_frames)
    return out


Forward = Callable[[PyTree, Any], tuple[Array, Array]]


def train_step_fn(
    forward: Forward,
    heads: Mapping[str, nn.Module],
    tx: optax.GradientTransformation,
    loss: Callable[[Array, Array], Array],
    cfg: ml_collections.ConfigDict,
    frame_loss: Callable[[Array, Array], Array] | None = None,
    patch_frames: int = 16,
) -> Callable[[ProbeState, PyTree, dict[str, Array]], tuple[ProbeState, dict[str, Array]]]:
    """The (unjitted) update of every probe and member on one batch {"spec", "labels"[, "valid"]} (and
    "frame_labels", "num_frames" for frame-wise probes, whose time patches are `patch_frames` frames);
    `forward(encoder_params, spec)` → (cls, patches) is the frozen encoder (`encoder_forward`), run once."""
    objective = _head_loss(heads, loss, float(cfg.probe.get("lasso_weight", 0.0)), frame_loss)

    def probe_train_step(state: ProbeState, encoder_params: PyTree, batch: dict[str, Array]):
        cls, patches = forward(encoder_params, batch["spec"])
        targets = batch_targets(batch, heads, patch_frames)

        def member(params, opt_state, peak_lr, key):
            grads, parts = jax.grad(objective, has_aux=True)(
                params, cls, patches, encoder_params, batch["spec"], targets, key
            )
            opt_state.hyperparams["learning_rate"] = heads_lib.lr_at(state.step, peak_lr, cfg)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, parts

        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.rng, state.step)
        params, opt_state, parts = jax.vmap(member)(state.params, state.opt_state, state.peak_lr, keys)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, parts

    return probe_train_step


def jit_train_step(
    forward: Forward,
    heads,
    tx,
    loss,
    cfg,
    out_sharding=None,
    frame_loss=None,
    patch_frames=16,
    compiler_options=None,
):
    """`train_step_fn` jitted, the state donated. `out_sharding` (e.g. replicated over the mesh) fixes the
    new state's placement: left to the partitioner, a leaf may come out sharded like the batch, and the
    next call, given another input sharding, would compile again. `compiler_options`: XLA's; None means
    `xla_options.inference()` (on CPU: no YNNPACK fusions, faster for these steps), {} XLA's defaults."""
    return jax.jit(
        train_step_fn(forward, heads, tx, loss, cfg, frame_loss, patch_frames),
        donate_argnums=(0,),
        out_shardings=out_sharding,
        compiler_options=xla_options.inference() if compiler_options is None else compiler_options,
    )


def eval_step_fn(
    forward: Forward, heads: Mapping[str, nn.Module]
) -> Callable[[PyTree, PyTree, dict[str, Array]], dict[str, Array]]:
    """(probe params [S, ...], encoder params, batch) → {name: logits [S, B, C] (frame-wise probes:
    [S, B, T', C]) float32}, dropout off."""

    def probe_eval_step(params: PyTree, encoder_params: PyTree, batch: dict[str, Array]) -> dict[str, Array]:
        cls, patches = forward(encoder_params, batch["spec"])
        out = {}
        for name, head in heads.items():
            logits = lambda p, head=head: head_logits(head, p, cls, patches, encoder_params, batch["spec"])  # noqa: E731
            out[name] = jax.vmap(logits)(params[name])
        return out

    return probe_eval_step


def jit_eval_step(forward: Forward, heads, compiler_options=None):
    """`eval_step_fn` jitted; `compiler_options` as `jit_train_step`'s."""
    options = xla_options.inference() if compiler_options is None else compiler_options
    return jax.jit(eval_step_fn(forward, heads), compiler_options=options)


def gates(params: PyTree, names: list[str]) -> dict[str, Array]:
    """{name: softmax gate [S, L]} of the gated probes among `names`."""
    return {name: jax.nn.softmax(params[name]["gate_logits"], axis=-1) for name in names}
