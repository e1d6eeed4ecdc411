"""One BAT pretraining step, pure and jittable: gradients of the SSL loss, AdamW, EMA teacher update.

    from bat_jax.train.config import load, optimizer, ssl_config     # the numbers live in configs/
    cfg = load("configs/pretrain/bat_base.py")
    config, tx = ssl_config(cfg), optimizer(cfg)     # SSLConfig, make_optimizer(**cfg.optim)
    state = init_train_state(config, tx, jax.random.key(0))
    step = jit_train_step(config, tx)                # jitted once, the state donated
    state, metrics = step(state, spec, jax.random.fold_in(key, i))

The optimizer sees the student (encoder + decoder) only; the teacher is the EMA of the student encoder,
updated after the optimizer step with the decay of the step count before the increment (the reference's
`EMA_Scheduler.step()` order): ``teacher ← λ(step) · teacher + (1 − λ(step)) · new student encoder``.

Gradient accumulation (``micro_batches`` m > 1): the masks are drawn once for the whole batch (the same as
with m = 1), the batch is cut into m strided micro-batches (rows i, i + m, i + 2m, ...: each device keeps its
own rows) and the update uses the mean of their gradients, which equals the whole batch's gradient up to
float32 summation order (every loss term is a mean over equally many rows and masked patches). The metrics
equal the whole batch's too: the losses are the micro-batch means, and target_var / pred_var are computed from
per-feature moments (count, mean, sum of squared deviations) merged across the micro-batches (Chan et al.'s
pairwise update), not averaged. ``grad_norm`` is the global L2 norm (float32) of the gradient the update
uses (the mean over the micro-batches), the same whatever the mesh. Sharded over a mesh:
bat_jax/train/sharded.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from bat_jax.models.ema import ema_decay, ema_update
from bat_jax.models.encoder import unbox
from bat_jax.models.ssl_losses import merge_moments, moments_std
from bat_jax.models.ssl_objective import (
    SSLConfig,
    bat_ssl_loss,
    bat_ssl_loss_with_masks,
    check_batch,
    draw_student_masks,
    init_params,
)

Array = jax.Array
PyTree = Any
VARIANCE_METRICS = ("target_var", "pred_var")  # metrics that are stds over the batch's rows

_WHERE = "bat_jax/train/step.py"


@flax.struct.dataclass
class TrainState:
    """``step`` int32 [] (completed updates), ``params`` {"encoder", "decoder"} (student),
    ``teacher_params`` (EMA encoder), ``opt_state`` (optax state of the student params)."""

    step: Array
    params: PyTree
    teacher_params: PyTree
    opt_state: PyTree


def make_optimizer(
    *,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    end_lr: float,
    b1: float,
    b2: float,
    weight_decay: float,
) -> optax.GradientTransformation:
    """AdamW (betas ``b1``, ``b2``; ``weight_decay`` on every student parameter, as the reference SSL script)
    with a linear warm-up from ``end_lr`` to ``peak_lr`` over ``warmup_steps``, then a cosine decay to
    ``end_lr`` at ``total_steps``. (The reference's warm-up starts at 0 and floors the rate at its minimum,
    so its first update also uses ``end_lr``.) The recipe's values: ``optim`` in
    configs/pretrain/bat_base.py."""
    schedule = lr_schedule(peak_lr=peak_lr, warmup_steps=warmup_steps, total_steps=total_steps, end_lr=end_lr)
    return optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay)


def lr_schedule(*, peak_lr: float, warmup_steps: int, total_steps: int, end_lr: float) -> optax.Schedule:
    """step → learning rate: linear from ``end_lr`` to ``peak_lr`` over ``warmup_steps``, cosine to ``end_lr``
    at ``total_steps``, then ``end_lr``."""
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"make_optimizer (bat_jax/train/step.py): expected 0 <= warmup_steps < total_steps, found "
            f"warmup_steps={warmup_steps}, total_steps={total_steps}"
        )
    return optax.warmup_cosine_decay_schedule(end_lr, peak_lr, warmup_steps, total_steps, end_lr)


def create_train_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
    """Step 0 from student params {"encoder", "decoder"} (plain or boxed); the teacher starts as a copy of
    the student encoder, in its own buffers so that the state can be donated."""
    params = jax.tree.map(jnp.asarray, unbox(params))
    teacher = jax.tree.map(jnp.copy, params["encoder"])
    return TrainState(jnp.zeros((), jnp.int32), params, teacher, tx.init(params))


def init_train_state(config: SSLConfig, tx: optax.GradientTransformation, rng: Array) -> TrainState:
    """Step 0 with a randomly initialised student (see `create_train_state`)."""
    return create_train_state(init_params(config, rng), tx)


def micro_split(x: Array, micro_batches: int) -> Array:
    """[B, ...] → [m, B/m, ...] with micro-batch i = rows i, i + m, i + 2m, ... (strided, so that a batch
    split over devices in contiguous blocks stays on its devices when B/m divides over them)."""
    b = x.shape[0]
    if b % micro_batches:
        raise ValueError(
            f"train_step ({_WHERE}): expected a batch divisible by micro_batches={micro_batches}, found "
            f"{b} rows"
        )
    x = x.reshape(b // micro_batches, micro_batches, *x.shape[1:])  # [B/m, m, ...]
    x = jnp.swapaxes(x, 0, 1)  # [m, B/m, ...]
    return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))


def loss_grads(
    params: PyTree, teacher_params: PyTree, spec: Array, key: Array, config: SSLConfig, micro_batches: int = 1
) -> tuple[dict[str, Array], PyTree]:
    """(metrics, gradients of the SSL loss w.r.t. the student ``params``) on ``spec`` [B, T, F] with masks
    drawn from ``key``; with ``micro_batches`` m > 1, the mean gradient over m strided micro-batches and the
    whole batch's metrics (module doc)."""
    if micro_batches == 1:
        (_, metrics), grads = jax.value_and_grad(bat_ssl_loss, has_aux=True)(
            params, teacher_params, spec, key, config
        )
        return metrics, grads
    check_batch(spec, config)
    b, v = spec.shape[0], config.num_views
    mask, ids_keep = draw_student_masks(key, b, config)  # [B·V, N], [B·V, K], rows clip-major
    specs = micro_split(spec, micro_batches)  # [m, B/m, T, F]
    rows = (micro_batches, b // micro_batches * v, -1)  # [m, B/m·V, ...]: each micro-batch's views
    masks = micro_split(mask.reshape(b, v, -1), micro_batches).reshape(rows)  # [m, B/m·V, N]
    ids = micro_split(ids_keep.reshape(b, v, -1), micro_batches).reshape(rows)  # [m, B/m·V, K]

    def micro(xs: tuple[Array, Array, Array]) -> tuple[PyTree, dict[str, Array], dict[str, tuple]]:
        grad_fn = jax.value_and_grad(functools.partial(bat_ssl_loss_with_masks, moments=True), has_aux=True)
        (_, metrics), grads = grad_fn(params, teacher_params, *xs, config)
        moments = {k: metrics.pop(k) for k in VARIANCE_METRICS}  # merged exactly, not averaged
        return grads, metrics, moments

    def body(total: tuple, xs: tuple[Array, Array, Array]) -> tuple[tuple, None]:
        grads, losses, moments = micro(xs)
        sums = jax.tree.map(jnp.add, total[:2], (grads, losses))
        merged = {k: merge_moments(total[2][k], m) for k, m in moments.items()}
        return (*sums, merged), None

    first = (specs[0], masks[0], ids[0])
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(micro, first))
    (grads, losses, moments), _ = jax.lax.scan(body, zeros, (specs, masks, ids))
    grads, losses = jax.tree.map(lambda a: a / micro_batches, (grads, losses))
    return {**losses, **{k: moments_std(m) for k, m in moments.items()}}, grads


def train_step(
    state: TrainState,
    spec: Array,
    key: Array,
    config: SSLConfig,
    tx: optax.GradientTransformation,
    micro_batches: int = 1,
) -> tuple[TrainState, dict[str, Array]]:
    """One update on ``spec`` [B, T, F] with masks drawn from ``key`` (gradients accumulated over
    ``micro_batches``); returns the new state and the float32 metrics {loss, global_loss, local_loss,
    target_var, pred_var, grad_norm, ema_decay}."""
    metrics, grads = loss_grads(state.params, state.teacher_params, spec, key, config, micro_batches)
    metrics = {**metrics, "grad_norm": grad_norm(grads)}
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, config.ema_start, config.ema_end, config.ema_warmup_steps)
    teacher = ema_update(state.teacher_params, params["encoder"], decay)
    metrics = {**metrics, "ema_decay": decay}
    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher, opt_state=opt_state)
    return new_state, metrics


def grad_norm(grads: PyTree) -> Array:
    """Global L2 norm of a gradient pytree, float32 [] (``optax.tree.norm`` of the float32 leaves); over
    sharded gradients inside a jitted step it is the norm of the whole tree (XLA adds the reduction)."""
    return optax.tree.norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))


def jit_train_step(
    config: SSLConfig, tx: optax.GradientTransformation, donate: bool = True, micro_batches: int = 1
) -> Callable[[TrainState, Array, Array], tuple[TrainState, dict[str, Array]]]:
    """``jit(state, spec, key) -> (state, metrics)`` for this config and optimizer; the state is donated.
    On one device; over a mesh: `bat_jax.train.sharded.jit_step`."""
    step = functools.partial(train_step, config=config, tx=tx, micro_batches=micro_batches)
    return jax.jit(step, donate_argnums=(0,) if donate else ())
