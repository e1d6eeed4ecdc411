"""The EMA teacher: its decay schedule against the reference's schedule list, and its update."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bat_jax.models.ema import ema_decay, ema_update
from bat_jax.train.config import ssl_preset

BAT = ssl_preset("bat_base")  # the recipe's EMA settings (configs/pretrain/bat_base.py)


def _reference_schedule(start, end, warmup):
    """The reference's list of decays: float32 linspace over the warm-up, then the end value."""
    return np.linspace(start, end, warmup, dtype=np.float32).tolist() + [end]


def test_ema_decay_schedule():
    start, end = BAT.ema_start, BAT.ema_end  # the recipe's ramp, against the reference's schedule list
    decay = jax.jit(ema_decay, static_argnames=("start", "end", "warmup_steps"))
    for warmup in (BAT.ema_warmup_steps, 5, 1):
        ref = _reference_schedule(start, end, warmup)
        for step in sorted({0, 1, 2, warmup // 2, warmup - 1, warmup, warmup + 1, 3 * warmup}):
            got = float(decay(jnp.int32(step), start=start, end=end, warmup_steps=warmup))
            want = np.float32(ref[min(step, warmup)])
            assert abs(got - want) <= 1.2e-7, f"warmup {warmup}, step {step}: {got} vs {want}"
    assert decay._cache_size() == 3  # one compilation per schedule, none per step


def test_ema_update():
    rng = np.random.default_rng(2)
    teacher = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": {"x": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)},
        "count": jnp.int32(3),
    }
    student = jax.tree.map(lambda x: x + jnp.ones_like(x), teacher)
    decay = ema_decay(7, 0.5, 0.9, warmup_steps=10)
    new = jax.jit(ema_update)(teacher, student, decay)
    d = np.float32(decay)
    np.testing.assert_allclose(np.asarray(new["w"]), d * teacher["w"] + (1 - d) * student["w"], rtol=1e-6)
    assert new["b"]["x"].dtype == jnp.bfloat16  # the teacher's dtype is kept
    assert int(new["count"]) == 4  # non-float leaves are copied from the student
    # the same as optax.incremental_update with step_size = 1 − decay
    floats = {"w": teacher["w"]}
    via_optax = optax.incremental_update({"w": student["w"]}, floats, step_size=1 - decay)
    np.testing.assert_allclose(
        np.asarray(ema_update(floats, {"w": student["w"]}, decay)["w"]), np.asarray(via_optax["w"]), atol=1e-6
    )
    # decay 1 keeps the teacher, decay 0 copies the student
    np.testing.assert_array_equal(np.asarray(ema_update(floats, {"w": student["w"]}, 1.0)["w"]), teacher["w"])
    np.testing.assert_array_equal(np.asarray(ema_update(floats, {"w": student["w"]}, 0.0)["w"]), student["w"])
