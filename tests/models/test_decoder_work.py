"""The SSL decoder's last block on the masked patches only (`Block(rows=)`, `VitDecoder(ids_masked=)`,
`bat_ssl_loss_with_masks`) gives the same values and gradients as computing every position and reading the
masked ones, to float32 tolerance (the step reads the masked predictions only: the local loss and pred_var).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.models import ssl_objective
from bat_jax.models.decoder import VitDecoder
from bat_jax.models.encoder import unbox
from bat_jax.models.layers import Block
from bat_jax.models.ssl_losses import pred_var, ssl_losses, target_var
from bat_jax.train.config import ssl_preset

MAX_REL_ERR = 1e-5  # ‖a − b‖ / ‖b‖ per array; the two paths differ in float32 summation order only (~1e-7),
# a wrong row or a dropped term is O(1); the project's parity tolerance with the reference is 1e-4


def close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)
    assert err <= MAX_REL_ERR, f"relative error {err:.2e} > {MAX_REL_ERR:.0e}"


def random_rows(key, batch: int, tokens: int, m: int):
    """[batch, m] distinct ascending token indices per row."""
    keys = jax.random.split(key, batch)
    return jnp.sort(jax.vmap(lambda k: jax.random.permutation(k, tokens)[:m])(keys), axis=1).astype(jnp.int32)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_block_rows_are_the_full_blocks_rows(layer_norm_first):
    block = Block(dim=32, num_heads=4, layer_norm_first=layer_norm_first)
    x = jax.random.normal(jax.random.key(0), (3, 24, 32))
    rows = random_rows(jax.random.key(1), 3, 24, 17)
    params = block.init(jax.random.key(2), x)
    full = block.apply(params, x)
    part = block.apply(params, x, rows)
    assert part.shape == (3, 17, 32)
    close(part, jnp.take_along_axis(full, rows[..., None], axis=1))


def test_decoder_at_masked_positions_equals_the_full_decoder_and_its_gradients():
    cfg = ssl_preset("tiny", frames=64, num_views=2).decoder
    rows, kept = 4, 10
    n = cfg.num_patches
    ids_keep = random_rows(jax.random.key(0), rows, n, kept)
    mask = jnp.ones((rows, n), bool).at[jnp.arange(rows)[:, None], ids_keep].set(False)
    ids_masked = ssl_objective.masked_ids(mask, n - kept)
    assert bool(jnp.all(jnp.take_along_axis(mask, ids_masked, axis=1)))
    tokens = jax.random.normal(jax.random.key(1), (rows, kept, cfg.in_dim))
    dec = VitDecoder(cfg)
    params = jax.jit(dec.init)(jax.random.key(2), tokens, ids_keep)

    def full(p, t):
        return jnp.take_along_axis(dec.apply(p, t, ids_keep), ids_masked[..., None], axis=1)

    def part(p, t):
        return dec.apply(p, t, ids_keep, ids_masked)

    def values_and_grads(f):  # jitted: one compilation instead of an op-by-op (eager) forward and backward
        grad = jax.grad(lambda p, t: jnp.sum(jnp.sin(f(p, t))), argnums=(0, 1))
        return jax.jit(lambda p, t: (f(p, t), grad(p, t)))(params, tokens)

    (out_part, g_part), (out_full, g_full) = values_and_grads(part), values_and_grads(full)
    close(out_part, out_full)
    jax.tree.map(close, g_part, g_full)


def test_the_objective_on_masked_predictions_equals_the_full_predictions_losses_and_gradients():
    cfg = ssl_preset("tiny", frames=64, num_views=3)
    b = 2
    params = ssl_objective.init_params(cfg, jax.random.key(0))
    params = unbox(params)
    teacher = jax.tree.map(lambda a: a * 0.9, params["encoder"])
    spec = jax.random.uniform(jax.random.key(1), (b, cfg.frames, cfg.encoder.n_mels))
    mask, ids_keep = ssl_objective.draw_student_masks(jax.random.key(2), b, cfg)

    def full_path(p):  # every position decoded, the masked ones read through `mask`
        targets = ssl_objective.teacher_targets(teacher, spec, cfg)
        cls, pred = ssl_objective.student_forward(p, spec, ids_keep, cfg)
        m = ssl_losses(pred, cls, targets, mask, cfg.num_views, cfg.global_weight, cfg.local_weight)
        m["target_var"], m["pred_var"] = target_var(targets), pred_var(pred, mask)
        return m["loss"], m

    def step_path(p):
        return ssl_objective.bat_ssl_loss_with_masks(p, teacher, spec, mask, ids_keep, cfg)

    (loss_f, m_f), g_f = jax.jit(jax.value_and_grad(full_path, has_aux=True))(params)
    (loss_s, m_s), g_s = jax.jit(jax.value_and_grad(step_path, has_aux=True))(params)
    assert set(m_f) == set(m_s)
    for k in m_f:
        close(m_s[k], m_f[k])
    assert float(m_s["local_loss"]) > 0.1  # a real comparison, not two zeros
    jax.tree.map(close, g_s, g_f)
