"""The CPU attention in chunks of rows (bat_jax/models/layers.py): how many chunks, and values and gradients
equal to all rows at once and to JAX's own attention, on one device and with the batch split over 8."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from bat_jax.models import layers
from bat_jax.models.layers import attention, attention_chunks


def _qkv_ct(shape):
    return tuple(jax.random.normal(key, shape) * 2 for key in jax.random.split(jax.random.key(1), 4))


def _value_and_grads(fn, q, k, v, ct):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * ct), argnums=(0, 1, 2)))(q, k, v)


def test_attention_chunks_counts_rows_per_device_against_the_byte_budget(monkeypatch):
    per_row = 3 * 512 * 512 * 4  # 3 heads x 512 tokens, float32: 3 MiB of scores per row
    assert attention_chunks(64, 3, 512, 4) == 32  # 8 MiB: 2 rows a chunk
    assert attention_chunks(64, 3, 103, 4) == 1  # the student's 103 tokens: all 64 rows fit
    assert attention_chunks(6, 3, 512, 4) == 3
    assert attention_chunks(5, 3, 512, 4) == 5  # a prime row count: one row a chunk
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", per_row - 1)
    assert attention_chunks(64, 3, 512, 4) == 64  # a row over the budget still runs, alone
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_chunks(64, 3, 512, 4) == 1  # accelerators: all rows at once


def test_chunked_attention_matches_all_rows_and_dot_product_attention(monkeypatch):
    q, k, v, ct = _qkv_ct((6, 9, 3, 8))
    whole = _value_and_grads(attention, q, k, v, ct)
    ref = _value_and_grads(jax.nn.dot_product_attention, q, k, v, ct)
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", 2 * 3 * 9 * 9 * 4)  # 2 rows a chunk: 3 chunks
    assert attention_chunks(6, 3, 9, 4) == 3
    chunked = _value_and_grads(attention, q, k, v, ct)
    for a, b, c in zip(jax.tree.leaves(chunked), jax.tree.leaves(whole), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the suite's 8 simulated CPU devices")
def test_chunked_attention_with_the_batch_split_over_8_devices(monkeypatch):
    q, k, v, ct = _qkv_ct((16, 9, 3, 8))
    whole = _value_and_grads(attention, q, k, v, ct)
    monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", 3 * 9 * 9 * 4)  # 1 row a chunk: 2 rows per device
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
        assert attention_chunks(16, 3, 9, 4) == 2
        sharded = _value_and_grads(attention, *(jax.device_put(x, rows) for x in (q, k, v, ct)))
        text = jax.jit(attention).lower(*(jax.device_put(x, rows) for x in (q, k, v))).as_text()
    assert "while" in text or "scan" in text  # the chunked path was traced
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
