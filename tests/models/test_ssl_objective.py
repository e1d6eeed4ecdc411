"""BAT's SSL model and train step.

Parity: one forward pass of the reference student (encoder + 2-block ViT decoder) and EMA teacher (same
weights), float32 CPU, dim 64, 2 clips × 4 views. Inputs: tests/golden/ssl_case/{spec.npz,
ssl_student.safetensors} (copied from the golden ssl.npz / ssl_student.safetensors) and the masks in
tests/golden/ssl_masks.npz; reference outputs: tests/golden/ssl_loss_case.npz (same golden file).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from bat_jax.convert.ssl import ssl_params_from_reference
from bat_jax.models import ssl_objective
from bat_jax.models.ema import ema_decay
from bat_jax.models.encoder import BatEncoder
from bat_jax.models.layers import GatedAttention, Mlp, layer_norm
from bat_jax.train import step as train
from bat_jax.train.config import pretrain_config, ssl_preset

ssl_tiny = functools.partial(ssl_preset, "tiny")  # configs/pretrain/tiny.py: the reference fixture's size
TINY_OPTIM = dict(pretrain_config("tiny").optim)

MAX_REL_ERR = 1e-4  # issue tolerance: ‖out − ref‖ / ‖ref‖


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


# ----------------------------------------------------------------------------------------------------
# Parity with the reference


@pytest.fixture(scope="module")
def case(golden_dir):
    out = {}
    for name in ("ssl_case/spec.npz", "ssl_masks.npz", "ssl_loss_case.npz"):
        with np.load(golden_dir / name) as f:
            out.update({k: f[k] for k in f.files if k != "reference_masks_512"})
    out["state"] = load_file(golden_dir / "ssl_case" / "ssl_student.safetensors")
    return out


@jax.jit
def _reference_pass(params, teacher, spec, mask, ids_keep):
    cfg = ssl_tiny()
    _, metrics = ssl_objective.bat_ssl_loss_with_masks(params, teacher, spec, mask, ids_keep, cfg)
    cls, pred = ssl_objective.student_forward(params, spec, ids_keep, cfg)
    return metrics, cls, pred, ssl_objective.teacher_targets(teacher, spec, cfg)


def test_student_decoder_teacher_and_losses_match_reference(case):
    cfg = ssl_tiny()
    assert int(case["num_views"]) == cfg.num_views
    params = ssl_params_from_reference(case["state"], cfg, "ssl_student.safetensors")
    metrics, cls, pred, targets = _reference_pass(
        params, params["encoder"], case["spec"], case["mask"].astype(bool), case["ids_keep_sorted"]
    )
    errors = {
        "student_cls": rel_err(cls, case["student_cls"]),
        "student_pred": rel_err(pred, case["student_pred"]),
        "targets": rel_err(targets, case["targets"]),
        "global_loss": rel_err(metrics["global_loss"], case["global_loss"]),
        "local_loss": rel_err(metrics["local_loss"], case["local_loss"]),
    }
    assert max(errors.values()) <= MAX_REL_ERR, errors
    assert metrics["loss"].dtype == jnp.float32
    np.testing.assert_allclose(
        float(metrics["loss"]), float(case["global_loss"] + case["local_loss"]), rtol=1e-5
    )
    assert 0 < float(metrics["pred_var"]) and 0 < float(metrics["target_var"]) <= 1.0


# ----------------------------------------------------------------------------------------------------
# Random tiny configurations

# 64 frames → a 4 × 8 patch grid (32 patches, 6 kept); a decoder narrower than the encoder (in_proj); a
# fast EMA so that one update moves the teacher visibly.
SMALL = ssl_tiny(frames=64, num_views=2, decoder_dim=32, ema_start=0.5, ema_end=0.9, ema_warmup_steps=10)


def _spec(key, batch=2, cfg=SMALL):
    return jax.random.uniform(key, (batch, cfg.frames, cfg.encoder.n_mels), jnp.float32)


def _random_like_init(config, seed):
    """Parameters with the tree and shapes of `init_params` (taken with eval_shape, nothing compiled: XLA
    compiles random initialisers slowly on a CPU), filled with numpy noise; LayerNorm scales around 1."""
    shapes = nn.meta.unbox(ssl_objective.abstract_params(config))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        noise = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
        return jnp.asarray(1.0 + noise if jax.tree_util.keystr(path).endswith("['scale']") else noise)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def small_params():
    return _random_like_init(SMALL, seed=0)


def test_init_params_tree_matches_the_reference_layout(case):
    cfg = ssl_tiny()
    init = nn.meta.unbox(ssl_objective.abstract_params(cfg))
    ref = ssl_params_from_reference(case["state"], cfg, "ssl_student.safetensors")
    assert jax.tree.structure(init) == jax.tree.structure(ref)
    assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(lambda x: x.shape, ref)


@jax.jit
def _ffn_layers_and_direct(params, spec):
    """The "ffn" teacher features and the same, computed block by block from the EOB outputs."""
    cfg = SMALL.replace(target="ffn")
    ffn = ssl_objective.teacher_layer_outputs(params, spec, cfg)  # [L, B, N, D]

    def hidden_states(module, spec):  # every block's output with CLS: [L, B, 1 + N, D]
        return module.encode_sequence(ssl_objective._tokens_with_positions(module, spec))

    hidden = BatEncoder(cfg.encoder).apply({"params": params}, spec, method=hidden_states)
    enc = cfg.encoder
    p1 = params["blocks_1"]  # block 1 reads block 0's output: r = LN₁(x + Attn(x)), ffn = MLP(r)
    x = hidden[0]
    attn = GatedAttention(enc.dim, enc.num_heads).apply({"params": p1["attn"]}, x)
    r = layer_norm(enc.eps, jnp.float32, jnp.float32, "norm1").apply({"params": p1["norm1"]}, x + attn)
    direct = Mlp(enc.dim, enc.mlp_dim).apply({"params": p1["mlp"]}, r)
    return ffn, direct[:, 1:]


def test_ffn_target_is_the_mlp_output_before_the_residual(small_params):
    ffn, direct = _ffn_layers_and_direct(small_params["encoder"], _spec(jax.random.key(1)))
    assert ffn.shape == (SMALL.encoder.depth, 2, SMALL.num_patches, SMALL.encoder.dim)
    assert rel_err(ffn[1], direct) <= 1e-5


@jax.jit
def _loss_and_grads(params, teacher, spec, key):
    return jax.value_and_grad(ssl_objective.bat_ssl_loss, has_aux=True)(params, teacher, spec, key, SMALL)


def test_random_loss_and_gradients_are_finite_and_nonzero(small_params):
    params = small_params
    assert params["decoder"]["in_proj"]["kernel"].shape == (64, 32)
    (loss, metrics), grads = _loss_and_grads(
        params, params["encoder"], _spec(jax.random.key(1)), jax.random.key(2)
    )
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert set(metrics) == {"loss", "global_loss", "local_loss", "target_var", "pred_var"}
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), jax.tree_util.keystr(path)
        assert np.any(g != 0), f"zero gradient for {jax.tree_util.keystr(path)}"


def test_bat_ssl_loss_checks_the_batch_once(small_params, monkeypatch):
    calls = []
    check = ssl_objective.check_batch
    counted = lambda spec, cfg: calls.append(spec.shape) or check(spec, cfg)
    monkeypatch.setattr(ssl_objective, "check_batch", counted)
    loss = functools.partial(ssl_objective.bat_ssl_loss, config=SMALL)
    spec = _spec(jax.random.key(1))
    jax.eval_shape(loss, small_params, small_params["encoder"], spec, jax.random.key(2))
    assert calls == [spec.shape]
    with pytest.raises(ValueError, match=r"expected spec \[batch, 64, 128\].*found \(2, 32, 128\)"):
        jax.eval_shape(loss, small_params, small_params["encoder"], spec[:, :32], jax.random.key(2))


def test_train_step_updates_student_and_ema_teacher_and_compiles_once(small_params):
    tx = train.make_optimizer(**{**TINY_OPTIM, "peak_lr": 1e-3, "warmup_steps": 0, "total_steps": 100})
    state = train.create_train_state(small_params, tx)
    spec = _spec(jax.random.key(1))
    key = jax.random.key(2)
    (before, _), _ = _loss_and_grads(state.params, state.teacher_params, spec, key)
    teacher0 = np.asarray(state.teacher_params["blocks_0"]["mlp"]["fc1"]["kernel"])

    step = train.jit_train_step(SMALL, tx)
    state, metrics = step(state, spec, key)
    # The teacher leaf follows the EMA formula with the decay of step 0 and the updated student.
    decay = np.float32(ema_decay(0, SMALL.ema_start, SMALL.ema_end, SMALL.ema_warmup_steps))
    assert float(metrics["ema_decay"]) == decay == np.float32(SMALL.ema_start)
    student1 = np.asarray(state.params["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"])
    teacher1 = np.asarray(state.teacher_params["blocks_0"]["mlp"]["fc1"]["kernel"])
    np.testing.assert_allclose(teacher1, decay * teacher0 + (1 - decay) * student1, rtol=1e-6, atol=1e-9)
    assert not np.allclose(student1, teacher0)
    assert int(state.step) == 1
    # The same batch and masks after one AdamW step: finite, and the loss went down.
    (after, _), _ = _loss_and_grads(state.params, state.teacher_params, spec, key)
    assert np.isfinite(float(after)) and float(after) < float(before), (float(before), float(after))

    for i in range(2):  # new keys and steps: no recompilation
        state, metrics = step(state, spec, jax.random.fold_in(key, i))
        assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 3
    assert step._cache_size() == 1
    decay2 = float(ema_decay(2, SMALL.ema_start, SMALL.ema_end, SMALL.ema_warmup_steps))
    assert float(metrics["ema_decay"]) == pytest.approx(decay2, rel=1e-7)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="target"):
        ssl_tiny(target="mlp")
    with pytest.raises(ValueError, match="frames"):
        ssl_tiny(frames=100)
    with pytest.raises(ValueError, match="divisible"):
        ssl_tiny(decoder_heads=5)
    with pytest.raises(ValueError, match=r"spec \[batch, 64, 128\]"):
        ssl_objective.check_batch(jnp.zeros((2, 32, 128)), SMALL)
    with pytest.raises(ValueError, match="warmup_steps"):
        train.make_optimizer(**{**TINY_OPTIM, "warmup_steps": 10, "total_steps": 10})
