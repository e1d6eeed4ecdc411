"""The VQT probe (bat_jax/models/vqt.py): the frozen encoder run with query tokens at every block.

Tiny encoder (dim 32, depth 2, 2 heads) with chunks of 2 time patches, so 80 frames = 5 time patches make
two equal chunks (folded into the batch) and a shorter last one, as a 10 s chunking of a long clip.
Float32 tolerance: the CLS/patch rows are the same arithmetic with or without the query rows, but the
matmuls have Q more rows, so XLA may block the reductions differently: differences are round-off of
O(1) LayerNorm outputs (observed ≤ 1e-6), checked at 1e-5.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.models import config as C
from bat_jax.models.encoder import BatEncoder, FrozenEncoder, abstract_params, unbox
from bat_jax.models.layers import sincos_2d
from bat_jax.models.vqt import (
    QUERY_PARAM,
    VQTProbe,
    encode_with_queries,
    init_vqt_params,
    make_vqt_probe,
    query_init_bound,
    vqt_logits,
)

TOL = 1e-5
NUM_CLASSES, NUM_QUERIES = 5, 3


def spec(batch, frames, seed=0):
    return jnp.asarray(np.random.default_rng(seed).random((batch, frames, 128), dtype=np.float32))


def _logits_and_queries(probe, x, encoder_params):
    """A method for ``probe.apply``: (logits, (EncoderOutput, query outputs [L, B, Q, D]))."""
    return probe(x, encoder_params), probe.query_outputs(x, encoder_params)


def random_encoder(cfg, seed=0):
    """Random weights straight from the parameter shapes (no init compile): LayerNorm scales near 1."""
    rng = np.random.default_rng(seed)
    shapes = unbox(abstract_params(cfg))

    def draw(path, s):
        x = rng.normal(size=s.shape).astype(np.float32)
        return 1.0 + 0.1 * x if path[-1].key == "scale" else 0.3 * x

    return FrozenEncoder(cfg, jax.tree_util.tree_map_with_path(draw, shapes))


@pytest.fixture(scope="module")
def setup():
    cfg = C.tiny(dim=32, depth=2, num_heads=2, chunk_time_patches=2)
    enc = random_encoder(cfg)
    probe = make_vqt_probe(NUM_CLASSES, cfg, num_queries=NUM_QUERIES)
    params = nn.unbox(init_vqt_params(probe, jax.random.key(1)))
    # the fc bias starts tiny; a visible one makes the head check below meaningful
    params = {**params, "fc": {**params["fc"], "bias": jnp.arange(NUM_CLASSES, dtype=jnp.float32)}}

    @jax.jit
    def run(probe_params, encoder_params, x):  # (logits, EncoderOutput, query outputs [L, B, Q, D])
        logits, (out, q) = probe.apply(
            {"params": probe_params}, x, encoder_params, method=_logits_and_queries
        )
        return logits, out, q

    return cfg, enc, probe, params, run


def test_params_and_init(setup):
    cfg, _, _, params, _ = setup
    q = params[QUERY_PARAM]
    assert q.shape == (cfg.depth, NUM_QUERIES, cfg.dim)
    bound = math.sqrt(6.0 / (3 * 16 * 16 + cfg.dim))
    assert query_init_bound(cfg) == pytest.approx(bound)
    assert float(jnp.max(jnp.abs(q))) <= bound and float(jnp.std(q)) > bound / 3  # U(-a, a)
    assert params["fc"]["kernel"].shape == (cfg.dim + cfg.depth * NUM_QUERIES * cfg.dim, NUM_CLASSES)
    assert set(params) == {QUERY_PARAM, "fc"}


def test_encoder_outputs_unchanged_by_queries(setup):
    cfg, enc, _, params, run = setup
    x = spec(2, 80)  # 5 time patches: 2 equal chunks (folded into the batch) + a shorter one
    logits, out, q = run(params, enc.params, x)
    ref = enc(x)  # the plain frozen encoder
    np.testing.assert_allclose(out.cls, ref.cls, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(out.patches, ref.patches, atol=TOL, rtol=TOL)
    assert q.shape == (cfg.depth, x.shape[0], NUM_QUERIES, cfg.dim)
    assert logits.shape == (x.shape[0], NUM_CLASSES) and logits.dtype == jnp.float32


def test_queries_depend_on_tokens_and_input_and_gradients(setup):
    cfg, enc, probe, params, run = setup
    x = spec(2, 80)
    _, out, q = run(params, enc.params, x)
    for layer in range(cfg.depth):  # move one block's query tokens
        moved = {**params, QUERY_PARAM: params[QUERY_PARAM].at[layer].add(0.1)}
        _, out2, q2 = run(moved, enc.params, x)
        assert float(jnp.abs(q2[layer] - q[layer]).max()) > 1e-3  # that block's query outputs move ...
        for other in set(range(cfg.depth)) - {layer}:  # ... no other block's: fresh tokens at every block
            np.testing.assert_array_equal(q2[other], q[other])
        np.testing.assert_array_equal(out2.cls, out.cls)  # nothing attends to the queries
        np.testing.assert_array_equal(out2.patches, out.patches)
    _, _, q3 = run(params, enc.params, spec(2, 80, seed=5))  # another input
    assert float(jnp.abs(q3 - q).max(axis=(1, 2, 3)).min()) > 1e-3

    # training step's gradient, with remat'd blocks (the prefix's size is static under nn.remat) and dropout
    remat = make_vqt_probe(
        NUM_CLASSES, cfg.replace(remat_policy="full"), num_queries=NUM_QUERIES, dropout_rate=0.2
    )
    w = jnp.asarray(np.random.default_rng(2).normal(size=(2, NUM_CLASSES)), jnp.float32)

    def loss(probe_params, encoder_params):
        logits = vqt_logits(
            remat, probe_params, encoder_params, x, deterministic=False, rng=jax.random.key(3)
        )
        return jnp.sum(w * logits)

    g_probe, g_enc = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, enc.params)
    assert all(float(jnp.abs(g).max()) > 0 for g in g_probe[QUERY_PARAM])  # every block's queries learn
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_probe["fc"]))
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_enc))  # stop_gradient


# ----------------------------------------------------------------------------------------------------
# Independent float64 numpy reference of a post-norm gated block with queries prepended


def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _lin(x, p, n_in=1):  # contract the last n_in axes of x with the first n_in of the kernel
    return np.tensordot(x, p["kernel"], axes=n_in) + p["bias"]


def _erf(x):
    return np.vectorize(math.erf)(x)


def _block_with_queries(p, queries, x, heads, eps):
    """queries [B, Q, D], tokens x [B, N, D] → [B, Q + N, D]: every token attends to x's tokens only."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    z = np.concatenate([queries, x], axis=1)  # [B, M, D]
    m, nq = z.shape[1], queries.shape[1]
    qkv = _lin(z, p["attn"]["qkv"])  # [B, M, 3, H, Dh]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])  # [B, H, M, M]
    s = np.where((np.arange(m) < nq)[None, None, None, :], -np.inf, s)  # mask: no key/value from a query
    a = np.exp(s - s.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", a, v) / (1.0 + np.exp(-_lin(z, p["attn"]["gate"])))  # gated
    h = _ln(z + _lin(o, p["attn"]["proj"], 2), p["norm1"], eps)
    f1 = _lin(h, p["mlp"]["fc1"])
    f = _lin(0.5 * f1 * (1.0 + _erf(f1 / math.sqrt(2.0))), p["mlp"]["fc2"])
    return _ln(h + f, p["norm2"], eps)


def test_matches_masked_reference_and_head(setup):
    """The whole VQT forward redone in float64 numpy: per chunk, block by block, an explicit attention mask
    keeps the query tokens out of the keys and values; query outputs and CLS averaged over the 3 chunks."""
    cfg, enc, probe, params, run = setup
    x = spec(2, 80)
    logits, out, q = run(params, enc.params, x)
    b, chunk, nq = x.shape[0], cfg.chunk_time_patches, NUM_QUERIES
    f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), {**enc.params, "q": params[QUERY_PARAM]})
    emb = np.asarray(BatEncoder(cfg).apply({"params": enc.params}, x, method="embed_patches"), np.float64)
    pos = sincos_2d(cfg.dim, cfg.pos_grid).astype(np.float64)
    cls_sum, q_sum, patches = 0.0, 0.0, []
    starts = range(0, emb.shape[1], chunk)
    for t0 in starts:  # time patches [0, 2), [2, 4), [4, 5)
        tokens = emb[:, t0 : t0 + chunk].reshape(b, -1, cfg.dim)
        cls = np.broadcast_to(f64["cls_token"], (b, 1, cfg.dim))
        h = _ln(np.concatenate([cls, tokens + pos[: tokens.shape[1]]], axis=1), f64["pre_norm"], cfg.eps)
        outs = []
        for layer in range(cfg.depth):
            queries = np.broadcast_to(f64["q"][layer], (b, nq, cfg.dim))  # fresh tokens, no pre_norm
            y = _block_with_queries(f64[f"blocks_{layer}"], queries, h, cfg.num_heads, cfg.eps)
            outs.append(y[:, :nq])
            h = y[:, nq:]
        cls_sum, q_sum = cls_sum + h[:, 0], q_sum + np.stack(outs)
        patches.append(h[:, 1:].reshape(b, -1, emb.shape[2], cfg.dim))
    want_q, want_cls = q_sum / len(starts), cls_sum / len(starts)
    np.testing.assert_allclose(q, want_q, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(out.cls[-1], want_cls, atol=TOL, rtol=TOL)
    np.testing.assert_allclose(out.patches[-1], np.concatenate(patches, axis=1), atol=TOL, rtol=TOL)

    # head: [final CLS / ‖·‖, then per layer its Q·D query outputs / ‖·‖ (one vector a layer)] @ W + b
    qo = want_q.transpose(1, 0, 2, 3).reshape(b, cfg.depth, -1)  # [B, L, Q·D]
    cls_hat = want_cls / np.linalg.norm(want_cls, axis=-1, keepdims=True)
    feats = np.concatenate([cls_hat, (qo / np.linalg.norm(qo, axis=-1, keepdims=True)).reshape(b, -1)], -1)
    want = feats @ np.asarray(params["fc"]["kernel"], np.float64) + np.asarray(params["fc"]["bias"])
    np.testing.assert_allclose(logits, want, atol=TOL, rtol=TOL)


def test_frame_wise_and_bad_arguments_raise(setup):
    cfg, enc, _, params, _ = setup
    with pytest.raises(ValueError, match="frame-wise"):
        make_vqt_probe(NUM_CLASSES, cfg, frame_wise=True)
    with pytest.raises(ValueError, match="frame-wise"):
        make_vqt_probe(NUM_CLASSES, cfg, pooling="frame")
    probe = VQTProbe(NUM_CLASSES, cfg.depth, cfg.dim, encoder=cfg, frame_wise=True)
    with pytest.raises(ValueError, match="frame-wise"):
        probe.apply({"params": params}, spec(2, 80), enc.params)
    with pytest.raises(TypeError, match="no field"):
        make_vqt_probe(NUM_CLASSES, cfg, num_prototypes=3)
    with pytest.raises(ValueError, match="do not match"):
        VQTProbe(NUM_CLASSES, cfg.depth + 1, cfg.dim, encoder=cfg).apply(
            {"params": params}, spec(2, 80), enc.params
        )
    with pytest.raises(ValueError, match="queries must be"):
        encode_with_queries(cfg, enc.params, spec(2, 80), jnp.zeros((cfg.depth, 2, cfg.dim + 1)))
