"""`EncoderConfig.scan_blocks` (bat_jax/models/encoder.py `BatEncoder.run_blocks`): the blocks run as one
`jax.lax.scan` over their stacked parameters. Same parameter tree as the loop, the same outputs and
gradients (with and without remat), the pretraining objective's loss and gradients unchanged, a while loop
in the compiled program, and the teacher's MLP-output targets (captured intermediates) still served."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.models import ssl_objective
from bat_jax.models.config import PRESETS
from bat_jax.models.encoder import BatEncoder, init_params
from bat_jax.train.config import ssl_preset

RTOL, ATOL = 1e-5, 1e-5


def _close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_blocks_equal_the_loop(remat):
    loop = PRESETS["tiny"](remat_policy=remat)
    scan = loop.replace(scan_blocks=True)
    params = init_params(loop, jax.random.key(0))
    assert jax.tree.structure(init_params(scan, jax.random.key(0))) == jax.tree.structure(params)
    spec = jax.random.normal(jax.random.key(1), (2, 64, loop.n_mels))
    weights = jax.random.normal(jax.random.key(2), (loop.depth, 2, 4, 8, loop.dim))

    def loss(cfg):  # every layer's patches weighted: the gradient reaches every block
        return lambda p: jnp.sum(weights * BatEncoder(cfg).apply({"params": p}, spec).patches)

    (v_loop, g_loop), (v_scan, g_scan) = (jax.jit(jax.value_and_grad(loss(c)))(params) for c in (loop, scan))
    np.testing.assert_allclose(float(v_scan), float(v_loop), rtol=RTOL)
    _close(g_scan, g_loop)
    text = jax.jit(loss(scan)).lower(params).compile().as_text()
    assert " while(" in text and " while(" not in jax.jit(loss(loop)).lower(params).compile().as_text()


@pytest.mark.parametrize("every_layer", [True, False])
def test_last_layer_only(every_layer):
    cfg = PRESETS["tiny"](scan_blocks=True)
    params = init_params(cfg, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (2, 9, cfg.dim))
    outs = [
        BatEncoder(c).apply({"params": params}, x, every_layer, method=BatEncoder.run_blocks)
        for c in (cfg, cfg.replace(scan_blocks=False))
    ]
    assert outs[0].shape == ((cfg.depth if every_layer else 1), 2, 9, cfg.dim)
    _close(outs[0], outs[1])


@pytest.mark.parametrize("target", ["eob", "ffn"])
def test_pretraining_loss_and_gradients_unchanged(target):
    loop = ssl_preset("tiny", frames=64, num_views=2, target=target)
    scan = loop.replace(encoder=loop.encoder.replace(scan_blocks=True))
    params = ssl_objective.init_params(loop, jax.random.key(0))
    spec = jax.random.uniform(jax.random.key(1), (2, 64, loop.encoder.n_mels))
    key = jax.random.key(3)
    teacher = jax.tree.map(lambda p: p * 0.9, params["encoder"])  # a teacher unlike the student

    def grads(cfg):
        fn = lambda p: ssl_objective.bat_ssl_loss(p, teacher, spec, key, cfg)[0]  # noqa: E731
        return jax.jit(jax.value_and_grad(fn))(params)

    (v_loop, g_loop), (v_scan, g_scan) = grads(loop), grads(scan)
    np.testing.assert_allclose(float(v_scan), float(v_loop), rtol=RTOL)
    _close(g_scan, g_loop)
