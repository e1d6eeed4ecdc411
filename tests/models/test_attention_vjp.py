"""The custom-VJP attention and the erf GELU of bat_jax/models/layers.py against JAX's own (autodiff)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.models import layers
from bat_jax.models.layers import attention, gelu_exact


@pytest.mark.parametrize("axes", ["bhkq", "bhqk"], ids=["keys_major_cpu", "queries_major"])
def test_attention_value_and_grads_match_dot_product_attention(monkeypatch, axes):
    """Both orders of the scores' axes (CPU's keys-major and the accelerators' queries-major)."""
    monkeypatch.setattr(layers, "_scores_axes", lambda: axes)
    q, k, v, ct = (jax.random.normal(key, (2, 7, 3, 8)) * 2 for key in jax.random.split(jax.random.key(0), 4))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * ct)

    ours = jax.value_and_grad(loss(attention), argnums=(0, 1, 2))(q, k, v)
    ref = jax.value_and_grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_gelu_exact_value_and_grad_match_jax_gelu():
    x = jnp.linspace(-9.0, 9.0, 301)
    np.testing.assert_allclose(
        gelu_exact(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6
    )  # 1 + erf cancels below x ≈ -5 (torch the same)
    d_ours = jax.vmap(jax.grad(gelu_exact))(x)
    d_ref = jax.vmap(jax.grad(lambda y: jax.nn.gelu(y, approximate=False)))(x)
    np.testing.assert_allclose(d_ours, d_ref, rtol=1e-5, atol=1e-6)
