"""The Flax encoder: shapes, positions, blocks, chunking, sharding, remat and the jit cache."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import load_file

from bat_jax.models import config as C
from bat_jax.models.encoder import (
    BatEncoder,
    FrozenEncoder,
    abstract_params,
    init_params,
    logical_axes,
    param_count,
    unbox,
)
from bat_jax.models.layers import Block, sincos_2d
from bat_jax.train.config import pretrain_config
from bat_jax.train.mesh import logical_rules

# The logical-axis rules of the pretraining configs (their one home: configs/pretrain/bat_base.py).
RULES = logical_rules(pretrain_config("bat_base"))


def spec(batch, frames, seed=0, n_mels=128):
    return np.random.default_rng(seed).random((batch, frames, n_mels), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------
# Config


def test_config_roundtrip_and_presets():
    for make in C.PRESETS.values():
        cfg = make()
        assert C.EncoderConfig.from_json(cfg.to_json()) == cfg
        assert C.EncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert (C.bat_base().dim, C.bat_base().depth, C.bat_base().num_heads) == (768, 12, 12)
    assert (C.bat_small().dim, C.bat_small().num_heads) == (384, 6)
    assert not C.eat_base().use_gate and C.bat_base().use_gate
    with pytest.raises(ValueError, match="divisible by num_heads"):
        C.tiny(num_heads=5)
    with pytest.raises(ValueError, match="remat_policy"):
        C.tiny(remat_policy="sometimes")
    with pytest.raises(ValueError, match="unknown EncoderConfig fields"):
        C.EncoderConfig.from_dict({"width": 3})


def test_bat_base_parameter_count():
    # PAPER.md §2.1: 7,678,464 per gated ViT-B block + patch embedding 197,376 + CLS + pre-norm.
    n = param_count(abstract_params(C.bat_base()))
    assert n == 12 * 7_678_464 + 197_376 + 768 + 2 * 768
    gates = 12 * (768 * 768 + 768)
    assert param_count(abstract_params(C.eat_base())) == n - gates


# ----------------------------------------------------------------------------------------------------
# Positions


def test_sincos_table_matches_reference_checkpoint(golden_dir):
    # The reference recomputes the (8, 64) grid table; the fixture stores the table it used.
    table = load_file(str(golden_dir / "bat_encoder" / "model.safetensors"))["pos_embed"][0]  # [512, 64]
    np.testing.assert_allclose(sincos_2d(64, C.POS_GRID_BAT), table, atol=1e-6)
    # The (8, 64) grid is not the (time, freq) layout of the tokens: EAT's (64, 8) table differs.
    assert np.abs(sincos_2d(64, C.POS_GRID_EAT) - table).max() > 0.5


# ----------------------------------------------------------------------------------------------------
# Blocks against a numpy transcription of the equations


def _ln(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def _numpy_block(p, x, layer_norm_first, eps=1e-6):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)

    def attn(h):
        qkv = np.einsum("bnd,dshk->bnshk", h, p["attn"]["qkv"]["kernel"]) + p["attn"]["qkv"]["bias"]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh]
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
        w = np.exp(logits - logits.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out = np.einsum("bhqs,bshk->bqhk", w, v)
        gate = np.einsum("bnd,dhk->bnhk", h, p["attn"]["gate"]["kernel"]) + p["attn"]["gate"]["bias"]
        out = out / (1 + np.exp(-gate))
        return np.einsum("bnhk,hkd->bnd", out, p["attn"]["proj"]["kernel"]) + p["attn"]["proj"]["bias"]

    def mlp(h):
        h = _gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
        return h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]

    if layer_norm_first:
        x = x + attn(_ln(x, p["norm1"], eps))
        return x + mlp(_ln(x, p["norm2"], eps))
    x = _ln(x + attn(x), p["norm1"], eps)
    return _ln(x + mlp(x), p["norm2"], eps)


@pytest.mark.parametrize("layer_norm_first", [False, True])
def test_block_matches_equations(layer_norm_first):
    block = Block(dim=32, num_heads=4, mlp_ratio=2.0, layer_norm_first=layer_norm_first)
    x = np.random.default_rng(1).normal(size=(2, 5, 32)).astype(np.float32)
    shapes = unbox(jax.eval_shape(block.init, jax.random.key(0), x)["params"])
    # Random weights everywhere (LayerNorm affine and biases too) so no identity/zero init hides a bug.
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda a: np.float32(0.3 * rng.normal(size=a.shape) + (a.ndim == 1)), shapes)
    got = jax.jit(block.apply)({"params": params}, x)
    want = _numpy_block(params, x.astype(np.float64), layer_norm_first)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------------------------------
# Encoder


def key(seed=0):
    return jax.random.key(seed, impl="rbg")  # compiles much faster on the CPU than threefry


@pytest.fixture(scope="module")
def tiny_enc():
    return FrozenEncoder.random(C.tiny(), rng=key())


def test_shapes_errors_and_unbatched_input(tiny_enc):
    out = tiny_enc(spec(2, 32))
    assert out.cls.shape == (3, 2, 64) and out.patches.shape == (3, 2, 2, 8, 64)
    one = tiny_enc(spec(2, 32)[0])  # [T, F] → batch of one
    assert one.cls.shape == (3, 1, 64) and one.patches.shape == (3, 1, 2, 8, 64)
    np.testing.assert_allclose(one.cls[:, 0], out.cls[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 16"):
        tiny_enc(spec(1, 40))
    with pytest.raises(ValueError, match=r"\[batch, frames, 128\]"):
        tiny_enc(spec(1, 32, n_mels=64))
    with pytest.raises(ValueError, match="multiple of 16"):
        BatEncoder(C.tiny()).apply({"params": tiny_enc.params}, jnp.zeros((1, 24, 128)))


def test_chunks_are_encoded_independently(tiny_enc):
    # 5 time patches with chunks of 2 → [2, 2, 1]: CLS averaged over the 3 chunks, patches concatenated.
    chunked = FrozenEncoder(C.tiny(chunk_time_patches=2), tiny_enc.params)
    x = spec(2, 80, seed=4)
    out = chunked(x)
    parts = [tiny_enc(x[:, a:b]) for a, b in ((0, 32), (32, 64), (64, 80))]  # each shorter than one chunk
    want_cls = sum(p.cls for p in parts) / 3
    want_patches = jnp.concatenate([p.patches for p in parts], axis=2)
    np.testing.assert_allclose(out.cls, want_cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.patches, want_patches, rtol=1e-5, atol=1e-5)


def test_jit_compiles_once_per_shape(tiny_enc):
    x = spec(3, 32)  # a shape no other test uses
    before = tiny_enc.cache_size()
    tiny_enc(x)
    assert tiny_enc.cache_size() == before + 1
    tiny_enc(x + 1.0)
    tiny_enc(jnp.asarray(x))
    assert tiny_enc.cache_size() == before + 1
    tiny_enc(spec(3, 48))
    assert tiny_enc.cache_size() == before + 2


def test_remat_gives_same_values_and_gradients(tiny_enc):
    params = {k: v for k, v in tiny_enc.params.items() if k not in ("blocks_1", "blocks_2")}  # one block
    x = jnp.asarray(spec(1, 16))
    rng = np.random.default_rng(5)
    r_cls, r_patches = rng.normal(size=(1, 1, 64)), rng.normal(size=(1, 1, 1, 8, 64))  # random projections
    results = []
    for policy in ("none", "dots_saveable"):
        module = BatEncoder(C.tiny(depth=1, remat_policy=policy))

        def loss(p, m=module):
            out = m.apply({"params": p}, x)
            return jnp.sum(out.cls * r_cls) + jnp.sum(out.patches * r_patches)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (value, grads), (want_value, want_grads) = results
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        assert float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)) < 1e-4


# ----------------------------------------------------------------------------------------------------
# Logical axis names and sharding


def test_init_without_mesh_carries_logical_names():
    params = init_params(C.tiny(), key())
    boxed = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxed and all(isinstance(x, nn.LogicallyPartitioned) for x in boxed)
    axes = logical_axes(params)
    assert axes["blocks_0"]["attn"]["qkv"]["kernel"] == PartitionSpec("embed", "qkv", "heads", "kv")
    assert axes["blocks_2"]["attn"]["proj"]["kernel"] == PartitionSpec("heads", "kv", "embed")
    assert axes["blocks_1"]["mlp"]["fc1"]["kernel"] == PartitionSpec("embed", "mlp")
    assert axes["cls_token"] == PartitionSpec("embed")
    plain = unbox(params)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(plain))
    k = plain["blocks_0"]["mlp"]["fc1"]["kernel"]  # Xavier-uniform bound √(6 / (64 + 256))
    assert float(jnp.abs(k).max()) <= np.sqrt(6 / 320)
    assert not np.any(np.asarray(plain["blocks_0"]["mlp"]["fc1"]["bias"]))


def test_init_and_apply_on_a_mesh(tiny_enc):
    assert jax.device_count() == 8
    cfg = C.tiny()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        shardings = nn.logical_to_mesh_sharding(logical_axes(abstract_params(cfg)), mesh, RULES)
        params = jax.jit(lambda rng: unbox(init_params(cfg, rng)), out_shardings=shardings)(key(1))
        kernel = params["blocks_0"]["attn"]["qkv"]["kernel"]  # [embed, qkv, heads, kv]
        assert kernel.sharding.spec == PartitionSpec("fsdp", None, None, None)
        assert len(kernel.addressable_shards) == 8
        assert kernel.addressable_shards[0].data.shape == (16, 3, 4, 16)
        x = jax.device_put(spec(8, 32), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
        out = jax.jit(lambda p, s: BatEncoder(cfg).apply({"params": p}, s))(params, x)
    # Same outputs as without a mesh: sharding changes the layout, not the numbers.
    want = FrozenEncoder(cfg, jax.device_get(params))(np.asarray(x)[:2])
    np.testing.assert_allclose(out.cls[:, :2], want.cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.patches[:, :2], want.patches, rtol=1e-5, atol=1e-5)
