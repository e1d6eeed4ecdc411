"""The EMA teacher of BAT's self-supervised objective: its decay schedule and its update (pure jnp)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any

_WHERE = "bat_jax/models/ema.py"


def ema_decay(step: Array | int, start: float, end: float, warmup_steps: int) -> Array:
    """EMA decay for the update that follows ``step`` completed updates (0 for the first): a linear ramp
    from ``start`` (step 0) to ``end`` (step ``warmup_steps − 1``), then ``end``, as the reference's
    ``np.linspace(start, end, warmup_steps)`` schedule. Float32, jittable on a traced ``step``. The recipe's
    values are ``ssl.ema_*`` in configs/pretrain/bat_base.py."""
    if warmup_steps < 0:
        raise ValueError(f"ema_decay ({_WHERE}): expected warmup_steps >= 0, found {warmup_steps}")
    step = jnp.asarray(step)
    frac = jnp.minimum(step, max(warmup_steps - 1, 0)).astype(jnp.float32) / max(warmup_steps - 1, 1)
    ramp = (1.0 - frac) * jnp.float32(start) + frac * jnp.float32(end)  # exact at both ends
    return jnp.where(step >= warmup_steps, jnp.float32(end), ramp)


def ema_update(teacher_params: PyTree, student_params: PyTree, decay: Array | float) -> PyTree:
    """decay · teacher + (1 − decay) · student, leaf by leaf: ``optax.incremental_update`` with
    step_size = 1 − decay, computed in float32 at least and cast back to the teacher's dtypes. Non-float
    leaves (counters) take the student's value, as the reference copies ``num_batches_tracked``."""

    def update(t: Array, s: Array) -> Array:
        if not jnp.issubdtype(jnp.result_type(t), jnp.inexact):
            return s
        dtype = jnp.promote_types(jnp.result_type(t), jnp.float32)  # update in float32 at least
        new = optax.incremental_update(jnp.asarray(s, dtype), jnp.asarray(t, dtype), 1.0 - decay)
        return new.astype(jnp.result_type(t))

    return jax.tree.map(update, teacher_params, student_params)
