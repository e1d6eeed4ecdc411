"""The min / max similarity pooling of CGP and ProtoBin (bat_jax/models/pooling.py): values and gradients
equal autodiff through the dense similarity matrix (random tokens: no ties), in one backward chunk and in
several, with and without the minimum; and each head's gradients equal those of the dense formulation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from bat_jax.models import layers, pooling
from bat_jax.models.probes import l2_normalize, make_probe, min_mid_max, mix_layers

RTOL, ATOL = 1e-5, 1e-6


def _dense(x, p):
    sim = jnp.einsum("gmd,kd->gmk", x, p)
    return jnp.min(sim, axis=1), jnp.max(sim, axis=1)


@pytest.mark.parametrize("chunk_bytes", [pooling.CHUNK_BYTES, 3 * 7 * 5 * 4], ids=["one_chunk", "chunked"])
@pytest.mark.parametrize("sim_bytes", [pooling.SIM_CHUNK_BYTES, 2 * 9 * 7 * 4], ids=["fwd_all", "fwd_chunks"])
@pytest.mark.parametrize("with_min", [True, False])
def test_values_and_gradients_equal_the_dense_autodiff(monkeypatch, chunk_bytes, sim_bytes, with_min):
    monkeypatch.setattr(pooling, "CHUNK_BYTES", chunk_bytes)  # 3 groups per chunk: 4 chunks of 12 groups
    monkeypatch.setattr(pooling, "SIM_CHUNK_BYTES", sim_bytes)  # forward: 2 groups per chunk, 6 chunks
    kx, kp, kw = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (12, 9, 5))  # [G, M, D]
    p = jax.random.normal(kp, (7, 5))  # [K, D]
    w_lo, w_hi = jax.random.normal(kw, (2, 12, 7))

    def loss(f):
        def inner(x, p):
            lo, hi = f(x, p)
            return jnp.sum(jnp.sin(hi) * w_hi) + (jnp.sum(jnp.cos(lo) * w_lo) if with_min else 0.0)

        return inner

    ours = lambda x, p: pooling.min_max_similarity(x, p, None, with_min)  # noqa: E731
    lo, hi = jax.jit(ours)(x, p)
    d_lo, d_hi = _dense(x, p)
    np.testing.assert_allclose(hi, d_hi, rtol=RTOL, atol=ATOL)
    if with_min:
        np.testing.assert_allclose(lo, d_lo, rtol=RTOL, atol=ATOL)
    else:
        assert not np.any(lo)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(x, p)
    g_dense = jax.jit(jax.grad(loss(_dense), argnums=(0, 1)))(x, p)
    for a, b in zip(g_ours, g_dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)
    assert np.count_nonzero(np.asarray(g_ours[0])) > 0


def _first_arg_token_gradient(x, p, with_min):
    """d(sum of hi [+ lo])/dx of our pooling, as a [G, M] mask of the tokens that received gradient."""
    grad = jax.grad(lambda x: sum(jnp.sum(a) for a in pooling.min_max_similarity(x, p, None, with_min)))(x)
    return np.asarray(jnp.any(grad != 0, axis=-1))


@pytest.mark.parametrize(
    "sim_bytes, backend",
    [(pooling.SIM_CHUNK_BYTES, "cpu"), (9 * 7 * 4, "cpu"), (pooling.SIM_CHUNK_BYTES, "gpu")],
    ids=["cpu_one_chunk", "cpu_chunks", "accelerator"],
)
def test_tied_tokens_send_the_gradient_to_the_first_as_argmax(monkeypatch, sim_bytes, backend):
    """Duplicated tokens tie exactly: the arg-max / arg-min found from the max / min (CPU) is jnp.argmax's
    (the first), as on accelerators; values equal the dense max / min."""
    monkeypatch.setattr(pooling, "SIM_CHUNK_BYTES", sim_bytes)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)  # read at trace time
    x = jax.random.normal(jax.random.key(5), (4, 9, 5))
    x = x.at[:, 6].set(x[:, 2]).at[:, 8].set(x[:, 2])  # tokens 2, 6 and 8 equal in every group
    p = jnp.concatenate([x[0, 2:3], -x[0, 2:3], jax.random.normal(jax.random.key(6), (5, 5))])  # [7, D]
    lo, hi = jax.jit(lambda x, p: pooling.min_max_similarity(x, p))(x, p)
    d_lo, d_hi = _dense(x, p)
    np.testing.assert_allclose(hi, d_hi, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(lo, d_lo, rtol=RTOL, atol=ATOL)
    sim = jnp.einsum("gmd,kd->gmk", x, p)
    _, _, i_lo, i_hi = pooling._pool(x, p, None, True, True)
    np.testing.assert_array_equal(i_hi, jnp.argmax(sim, axis=1))
    np.testing.assert_array_equal(i_lo, jnp.argmin(sim, axis=1))
    assert int(i_hi[0, 0]) == 2 and int(i_lo[0, 1]) == 2  # prototype 0 is token 2: the first of 2, 6, 8
    touched = _first_arg_token_gradient(x, p, with_min=True)
    assert touched[0, 2] and not touched[0, 6] and not touched[0, 8]


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the suite's 8 simulated CPU devices")
def test_chunked_forward_with_the_groups_split_over_8_devices(monkeypatch):
    monkeypatch.setattr(pooling, "SIM_CHUNK_BYTES", 9 * 7 * 4)  # 1 group a chunk: 2 groups per device
    x = jax.random.normal(jax.random.key(7), (16, 9, 5))
    p = jax.random.normal(jax.random.key(8), (7, 5))
    loss = lambda x, p: sum(jnp.sum(jnp.sin(a)) for a in pooling.min_max_similarity(x, p))  # noqa: E731
    whole = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, p)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("batch", "data")]):
        assert layers.row_chunks(16, 9 * 7 * 4, pooling.SIM_CHUNK_BYTES) == 2
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        sharded = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(xs, p)
        text = jax.jit(loss).lower(xs, p).as_text()
    assert "while" in text  # the chunked forward was traced
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["cgp", "cgp_patch_avg", "cgp_frame", "protobin"])
def test_probe_gradients_equal_the_dense_formulation(name):
    """The head (sparse backward) against the same head written on the dense [B, T, F, K] similarities."""
    probe = make_probe(name, 6, 3, 8, num_prototypes=10, dropout_rate=0.0)
    cls = jax.random.normal(jax.random.key(1), (3, 2, 8))  # [L, B, D]
    patches = jax.random.normal(jax.random.key(2), (3, 2, 4, 3, 8))  # [L, B, T, F, D]
    params = probe.init(jax.random.key(3), cls, patches)["params"]
    params = jax.tree.map(
        lambda a: a.value if hasattr(a, "value") else a, params, is_leaf=lambda a: hasattr(a, "value")
    )

    def dense_logits(params):
        p_hat = l2_normalize(params["prototypes"])
        fc = params["fc"]
        if name == "protobin":
            p_sign = jnp.where(params["prototypes"] >= 0, 1.0, -1.0)
            p_hat = l2_normalize(p_sign + params["prototypes"] - jax.lax.stop_gradient(params["prototypes"]))
            sim = jnp.einsum("btfd,kd->btfk", l2_normalize(patches[-1]), p_hat)
            feats = jnp.max(sim, axis=(1, 2))
        else:
            alpha = jax.nn.softmax(params["gate_logits"])
            z = mix_layers(alpha, l2_normalize(patches))
            sim = jnp.einsum("btfd,kd->btfk", z, p_hat)
            if name == "cgp_frame":
                feats = min_mid_max(sim, axes=(2,))
            elif name == "cgp_patch_avg":
                feats = min_mid_max(sim, axes=(1, 2))
            else:
                o = mix_layers(alpha, l2_normalize(cls))
                feats = min_mid_max(sim, axes=(1, 2), mid=o @ p_hat.T)
        return feats @ fc["kernel"] + fc["bias"]

    def ours(params):
        return probe.apply({"params": params}, cls, patches)

    np.testing.assert_allclose(jax.jit(ours)(params), jax.jit(dense_logits)(params), rtol=RTOL, atol=ATOL)
    target = jax.random.normal(jax.random.key(4), jax.eval_shape(ours, params).shape)
    g_ours = jax.jit(jax.grad(lambda q: jnp.sum(ours(q) * target)))(params)
    g_dense = jax.jit(jax.grad(lambda q: jnp.sum(dense_logits(q) * target)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=ATOL), g_ours, g_dense)
