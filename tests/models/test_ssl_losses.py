"""SSL objective pieces: losses against one forward pass of the reference (tests/golden/ssl_loss_case.npz,
copied from the golden ssl.npz: dim 64, 2 clips × 4 views), teacher targets against a direct numpy
transcription of the formula, and the variance metrics (the EMA teacher: test_ema.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.models.ssl_losses import (
    feature_std,
    pred_var,
    ssl_losses,
    ssl_targets,
    target_var,
)
from bat_jax.train.config import ssl_preset

RTOL = 1e-4  # issue tolerance for loss parity
# The reference case was computed with the recipe's settings (configs/pretrain/bat_base.py).
BAT = ssl_preset("bat_base")
WEIGHTS = {"global_weight": BAT.global_weight, "local_weight": BAT.local_weight}

# Jitted once here: one compilation per input shape is much faster on a CPU than op-by-op dispatch.
_ssl_losses = jax.jit(ssl_losses, static_argnames=("num_views",))
_ssl_targets = jax.jit(ssl_targets, static_argnames=("instance_norm", "layer_norm"))
_feature_std = jax.jit(feature_std)


@pytest.fixture(scope="module")
def case(golden_dir):
    with np.load(golden_dir / "ssl_loss_case.npz") as f:
        return {k: f[k] for k in f.files}


def _losses(case, **kw):
    return _ssl_losses(
        case["student_pred"],
        case["student_cls"],
        case["targets"],
        case["mask"].astype(bool),
        int(case["num_views"]),
        **{**WEIGHTS, **kw},
    )


def test_losses_match_reference(case):
    out = _ssl_losses(
        case["student_pred"], case["student_cls"], case["targets"], case["mask"], num_views=4, **WEIGHTS
    )
    assert int(case["num_views"]) == 4
    for name in ("global_loss", "local_loss"):
        ref = float(case[name])
        assert abs(float(out[name]) - ref) <= RTOL * abs(ref), f"{name}: {float(out[name])} vs {ref}"
        assert out[name].dtype == jnp.float32
    np.testing.assert_allclose(float(out["loss"]), float(case["global_loss"] + case["local_loss"]), rtol=RTOL)


def test_loss_weights_and_low_precision_inputs(case):
    ref = _losses(case)
    weighted = _losses(case, global_weight=0.5, local_weight=2.0)
    np.testing.assert_allclose(
        float(weighted["loss"]), 0.5 * float(ref["global_loss"]) + 2.0 * float(ref["local_loss"]), rtol=1e-6
    )
    bf16 = _ssl_losses(
        jnp.asarray(case["student_pred"], jnp.bfloat16),
        jnp.asarray(case["student_cls"], jnp.bfloat16),
        case["targets"],
        case["mask"],
        int(case["num_views"]),
        **WEIGHTS,
    )
    assert bf16["loss"].dtype == jnp.float32
    np.testing.assert_allclose(float(bf16["loss"]), float(ref["loss"]), rtol=2e-2)


def test_views_are_clip_major():
    """Rows b · V + v belong to clip b: a student that outputs each clip's target exactly has zero loss."""
    rng = np.random.default_rng(0)
    b, v, n, d = 3, 2, 10, 4
    targets = rng.normal(size=(b, n, d)).astype(np.float32)
    pred = np.repeat(targets, v, axis=0)  # [B·V, N, D], clip-major
    cls = np.repeat(targets.mean(axis=1), v, axis=0)  # [B·V, D]
    mask = rng.random((b * v, n)) < 0.8
    out = _ssl_losses(pred, cls, targets, mask, v, 1.0, 1.0)
    assert float(out["global_loss"]) < 1e-12 and float(out["local_loss"]) == 0.0
    # the other layout (views-major, np.tile) is not what the loss expects
    tiled = _ssl_losses(
        np.tile(targets, (v, 1, 1)), np.tile(targets.mean(axis=1), (v, 1)), targets, mask, v, 1.0, 1.0
    )
    assert float(tiled["global_loss"]) > 0.01 and float(tiled["local_loss"]) > 0.1
    # unmasked patches do not count; masked ones do, as mean over D then mean over masked patches
    pred[0, ~mask[0]] += 100.0
    pred[0, mask[0]] += 1.0
    out = _ssl_losses(pred, cls, targets, mask, v, 1.0, 1.0)
    np.testing.assert_allclose(float(out["local_loss"]), mask[0].sum() / mask.sum(), rtol=1e-6)


def test_loss_shape_errors_say_what_was_expected(case):
    with pytest.raises(ValueError, match=r"expected pred of shape \(6, 512, 64\)"):
        _ssl_losses(case["student_pred"], case["student_cls"], case["targets"], case["mask"], 3, 1.0, 1.0)


def _targets_numpy(y, eps):
    """Direct transcription: instance norm over tokens per layer, mean over layers, layer norm over D."""
    y = y.astype(np.float64)
    y = (y - y.mean(axis=2, keepdims=True)) / np.sqrt(y.var(axis=2, keepdims=True) + eps)
    y = y.mean(axis=0)
    return (y - y.mean(axis=-1, keepdims=True)) / np.sqrt(y.var(axis=-1, keepdims=True) + eps)


def test_targets_match_formula():
    rng = np.random.default_rng(1)
    n_layers, b, n, d = 3, 2, 16, 8
    # layers with very different offsets and scales, so the instance norm matters
    scale = rng.uniform(0.1, 10.0, size=(n_layers, 1, 1, d))
    y = (rng.normal(size=(n_layers, b, n, d)) * scale + rng.normal(size=(n_layers, b, 1, d)) * 5).astype(
        np.float32
    )
    got = _ssl_targets(y, 1e-6, instance_norm=True, layer_norm=True)
    assert got.shape == (b, n, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _targets_numpy(y, 1e-6), rtol=1e-5, atol=1e-5)
    # a large eps is really inside the square root of both norms
    np.testing.assert_allclose(
        np.asarray(_ssl_targets(y, 0.5, instance_norm=True, layer_norm=True)),
        _targets_numpy(y, 0.5),
        rtol=1e-5,
        atol=1e-5,
    )
    # bf16 inputs are normalised in float32
    bf16 = _ssl_targets(jnp.asarray(y, jnp.bfloat16), 1e-6, instance_norm=True, layer_norm=True)
    assert bf16.dtype == jnp.float32
    # the norms can be switched off (plain layer mean)
    np.testing.assert_allclose(
        np.asarray(_ssl_targets(y, 1e-6, instance_norm=False, layer_norm=False)), y.mean(axis=0), rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"expected layer outputs \[L, B, N, D\]"):
        _ssl_targets(y[0], 1e-6, instance_norm=True, layer_norm=True)


def test_variance_metrics_match_data2vec_compute_var(case):
    def compute_var(x):  # data2vec 2.0: sqrt(unbiased var over all rows + 1e-6), mean over features
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        return np.sqrt(x.var(axis=0, ddof=1) + 1e-6).mean()

    targets, pred, mask = case["targets"], case["student_pred"], case["mask"].astype(bool)
    np.testing.assert_allclose(float(jax.jit(target_var)(targets)), compute_var(targets), rtol=1e-5)
    np.testing.assert_allclose(float(jax.jit(pred_var)(pred, mask)), compute_var(pred[mask]), rtol=1e-5)
    # a collapsed representation gives sqrt(eps)
    np.testing.assert_allclose(float(_feature_std(jnp.ones((5, 7, 3)))), 1e-3, rtol=1e-5)
