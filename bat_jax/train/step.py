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
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from bat_jax.models.ema import ema_decay, ema_update
from bat_jax.models.encoder import unbox
from bat_jax.models.ssl_objective import SSLConfig, bat_ssl_loss, init_params

Array = jax.Array
PyTree = Any


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


def train_step(
    state: TrainState,
    spec: Array,
    key: Array,
    config: SSLConfig,
    tx: optax.GradientTransformation,
) -> tuple[TrainState, dict[str, Array]]:
    """One update on ``spec`` [B, T, F] with masks drawn from ``key``; returns the new state and the float32
    metrics {loss, global_loss, local_loss, target_var, pred_var, ema_decay}."""
    grad_fn = jax.value_and_grad(bat_ssl_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, state.teacher_params, spec, key, config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, config.ema_start, config.ema_end, config.ema_warmup_steps)
    teacher = ema_update(state.teacher_params, params["encoder"], decay)
    metrics = {**metrics, "ema_decay": decay}
    new_state = state.replace(step=state.step + 1, params=params, teacher_params=teacher, opt_state=opt_state)
    return new_state, metrics


def jit_train_step(
    config: SSLConfig, tx: optax.GradientTransformation, donate: bool = True
) -> Callable[[TrainState, Array, Array], tuple[TrainState, dict[str, Array]]]:
    """``jit(state, spec, key) -> (state, metrics)`` for this config and optimizer; the state is donated."""
    step = functools.partial(train_step, config=config, tx=tx)
    return jax.jit(step, donate_argnums=(0,) if donate else ())
