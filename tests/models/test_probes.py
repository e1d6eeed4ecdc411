"""Probe heads (bat_jax.models.probes) and probe losses (bat_jax.models.losses).

Parity data: tests/golden/heads.npz holds the reference (PyTorch) heads' weights and eval-mode logits on the
reference encoder features in tests/golden/probe_features.npz (patches in the reference layout
[L, B, D, T, F]); see /work/shared/reference/README.md.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bat_jax.convert.probes import probe_params_from_reference
from bat_jax.models import losses, probes

PARITY_TOL = 1e-4  # max ‖out − ref‖ / ‖ref‖, fixed by the issue
REF_LAYERS, REF_DIM = 3, 64  # the reference profile's encoder depth and width (profile.json)


def _key(seed):
    """A PRNG key of the "rbg" implementation: much faster to compile on the CPU than threefry."""
    return jax.random.key(seed, impl="rbg")


@pytest.fixture(scope="module")
def heads(golden_dir):
    with np.load(golden_dir / "heads.npz") as z:
        return dict(z)


@pytest.fixture(scope="module")
def feats(golden_dir):
    with np.load(golden_dir / "probe_features.npz") as z:
        f = dict(z)
    to_ours = (0, 1, 3, 4, 2)  # reference [L, B, D, T, F] -> ours [L, B, T, F, D]
    return {
        "short": (f["cls_short"], np.transpose(f["patches_short"], to_ours)),
        "long": (f["cls_long"], np.transpose(f["patches_long"], to_ours)),
    }


def _ref_arrays(heads, name):
    prefix = name + "__"
    return {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix) and k != prefix + "logits"}


def _reference_probe(heads, name, **kw):
    """Our probe with the reference head's sizes and weights."""
    arrays = _ref_arrays(heads, name)
    if "prototype_vectors" in arrays:
        kw.setdefault("num_prototypes", arrays["prototype_vectors"].shape[0])
    num_classes = heads[name + "__logits"].shape[-1]
    probe = probes.make_probe(name, num_classes, num_layers=REF_LAYERS, dim=REF_DIM, **kw)
    like = jax.eval_shape(lambda: probes.init_params(probe, jax.random.key(0)))
    return probe, probe_params_from_reference(name, arrays, like=like)


def _random_params(probe, seed=0):
    """Random parameters of the probe's shapes, drawn in numpy (no init compile: keeps tests fast)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: nn.unbox(probes.init_params(probe, jax.random.key(0))))
    return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


def _rel_err(out, ref):
    return float(np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref))


# ----------------------------------------------------------------------------------------------------
# Parity with the reference heads


@pytest.mark.parametrize("name", probes.PROBE_NAMES)
def test_parity_with_reference(name, heads, feats):
    probe, params = _reference_probe(heads, name)
    cls, patches = feats["long" if name == "cgp_frame" else "short"]
    out = jax.jit(probe.apply)({"params": params}, cls, patches)
    ref = heads[name + "__logits"]
    assert out.shape == ref.shape and out.dtype == jnp.float32
    assert _rel_err(out, ref) <= PARITY_TOL


def test_h2t_group_scale_is_sqrt_num_classes(heads):
    """The reference buffer `group_scale` is √C: per-feature groups, our layer_dim=None default."""
    num_classes = heads["h2t__fc.weight"].shape[0]
    np.testing.assert_allclose(heads["h2t__group_scale"], math.sqrt(num_classes), rtol=1e-6)
    _, params = _reference_probe(heads, "h2t")
    w = heads["h2t__fc.weight"].astype(np.float64)  # [C, in]
    expected = np.linalg.norm(w, axis=0).sum() * heads["h2t__group_scale"]
    np.testing.assert_allclose(probes.group_lasso_penalty(params), expected, rtol=1e-5)


# Reference behaviour of the variants that heads.npz does not cover, transcribed in numpy (float64).


def _np_ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _np_softmax(a):
    e = np.exp(a - a.max())
    return e / e.sum()


def _np_unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _np_variant(name, pooling, a, cls, patches):
    """a: reference arrays (float64); returns logits."""
    fc = lambda x: x @ a["fc.weight"].T + a["fc.bias"]
    ln = lambda x: _np_ln(x, a["ln.weight"], a["ln.bias"])
    if name == "protobin":
        p = _np_unit(np.where(a["prototype_vectors"][:, :, 0, 0] >= 0, 1.0, -1.0))
        sim = _np_unit(patches[-1]) @ p.T  # [B, T, F, K]
        return fc(sim.max(axis=2))
    per_layer = patches.mean(axis=(2, 3)) if pooling == "patch_avg" else patches.mean(axis=3)
    if name == "lp":
        return fc(ln(per_layer[-1]))
    if name == "lcgp":
        return fc(ln(np.tensordot(_np_softmax(a["block_attention"]), per_layer, axes=1)))
    x = np.moveaxis(per_layer, 0, -2)  # h2t: [B, (T,) L, D]
    return fc(ln(x.reshape(x.shape[:-2] + (-1,))))


@pytest.mark.parametrize(
    "name,kw",
    [
        ("lp", {"pooling": "patch_avg"}),
        ("lp", {"pooling": "frame"}),
        ("lcgp", {"pooling": "patch_avg"}),
        ("lcgp", {"pooling": "frame"}),
        ("h2t", {"pooling": "patch_avg"}),
        ("h2t", {"pooling": "frame"}),
        ("protobin", {"frame_wise": True}),
    ],
)
def test_baseline_variants_match_numpy(name, kw, heads, feats):
    probe, params = _reference_probe(heads, name, **kw)
    cls, patches = feats["short"]
    out = jax.jit(probe.apply)({"params": params}, cls, patches)
    a = {k: v.astype(np.float64) for k, v in _ref_arrays(heads, name).items()}
    ref = _np_variant(name, kw.get("pooling"), a, cls.astype(np.float64), patches.astype(np.float64))
    frame = kw.get("pooling") == "frame" or kw.get("frame_wise")
    assert out.shape == ((2, patches.shape[2], 5) if frame else (2, 5))
    assert _rel_err(out, ref) <= PARITY_TOL


# ----------------------------------------------------------------------------------------------------
# Gates, dropout, ProtoBin STE, shapes, errors


@pytest.mark.parametrize("name,init_value", [("cgp", 1.0), ("lcgp", 0.0)])
def test_gates_init_equal_sum_to_one_and_readable(name, init_value):
    probe = probes.make_probe(
        name, num_classes=3, num_layers=5, dim=8, **({} if name == "lcgp" else {"num_prototypes": 4})
    )
    boxed = {"params": probes.init_params(probe, _key(1))}
    assert isinstance(boxed["params"]["gate_logits"], nn.Partitioned)
    params = nn.unbox(boxed["params"])
    assert params["gate_logits"].shape == (5,)
    np.testing.assert_array_equal(params["gate_logits"], np.full(5, init_value))  # reference init
    gates = probes.layer_gates(params)
    np.testing.assert_allclose(gates, np.full(5, 0.2), rtol=1e-6)
    np.testing.assert_allclose(gates.sum(), 1.0, rtol=1e-6)
    # also readable from the boxed {"params": ...} variables that probe.init returns
    np.testing.assert_allclose(probes.layer_gates(boxed), gates)
    moved = {**params, "gate_logits": jnp.array([0.0, 0.0, 3.0, 0.0, 0.0])}
    gates = probes.layer_gates(moved)
    assert int(jnp.argmax(gates)) == 2 and math.isclose(float(gates.sum()), 1.0, rel_tol=1e-6)


def test_layer_gates_of_a_probe_without_gate_says_so():
    probe = probes.make_probe("lp", num_classes=3, num_layers=2, dim=8)
    with pytest.raises(KeyError, match="gate_logits"):
        probes.layer_gates(probes.init_params(probe, _key(0)))


def test_dropout_active_only_when_not_deterministic():
    probe = probes.make_probe("cgp", num_classes=3, num_layers=2, dim=8, num_prototypes=16, dropout_rate=0.5)
    params = {"params": _random_params(probe)}
    rng = np.random.default_rng(0)
    cls, patches = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 4, 3, 8, 8))
    apply = jax.jit(probe.apply, static_argnames="deterministic")
    eval_a = apply(params, cls, patches)
    eval_b = apply(params, cls, patches, deterministic=True, rngs={"dropout": _key(3)})
    np.testing.assert_array_equal(eval_a, eval_b)
    train_a = apply(params, cls, patches, deterministic=False, rngs={"dropout": _key(3)})
    train_b = apply(params, cls, patches, deterministic=False, rngs={"dropout": _key(4)})
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)
    with pytest.raises(Exception, match="dropout"):
        probe.apply(params, cls, patches, deterministic=False)  # training needs a dropout rng


def test_protobin_binarises_forward_and_straight_through_gradient():
    probe = probes.make_probe("protobin", num_classes=3, num_layers=2, dim=8, num_prototypes=6)
    params = _random_params(probe)
    rng = np.random.default_rng(0)
    patches = rng.normal(size=(2, 2, 3, 4, 8)).astype(np.float32)
    apply = jax.jit(probe.apply)
    out = apply({"params": params}, None, patches)
    # only the signs of the prototypes matter in the forward pass
    rescaled = {
        **params,
        "prototypes": params["prototypes"] * rng.uniform(0.1, 9.0, size=(6, 8)).astype(np.float32),
    }
    np.testing.assert_allclose(apply({"params": rescaled}, None, patches), out, rtol=1e-6)

    def loss(p):
        return jnp.sum(apply({"params": p}, None, patches) ** 2)

    grad = jax.jit(jax.grad(loss))(params)["prototypes"]
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0
    # identity straight-through: binarize_ste's vjp passes the cotangent unchanged
    x = jnp.array([-0.3, 0.0, 0.7])
    np.testing.assert_array_equal(probes.binarize_ste(x), [-1.0, 1.0, 1.0])
    np.testing.assert_array_equal(
        jax.grad(lambda v: jnp.sum(probes.binarize_ste(v) * jnp.arange(3.0)))(x), [0.0, 1.0, 2.0]
    )


def test_group_lasso_penalty_hand_example():
    kernel = jnp.array([[3.0, 4.0], [0.0, 0.0], [6.0, 8.0], [1.0, 0.0]])  # [in=4, C=2]
    params = {"fc": {"kernel": kernel, "bias": jnp.zeros(2)}}
    # per-feature groups: (5 + 0 + 10 + 1) · √2
    penalty = jax.jit(probes.group_lasso_penalty, static_argnames="layer_dim")
    np.testing.assert_allclose(penalty(params), 16 * math.sqrt(2), rtol=1e-6)
    grad = jax.jit(jax.grad(lambda k: probes.group_lasso_penalty({"fc": {"kernel": k}})))(kernel)
    np.testing.assert_allclose(
        grad, np.array([[0.6, 0.8], [0, 0], [0.6, 0.8], [1, 0]]) * math.sqrt(2), rtol=1e-6
    )
    # layer-wise groups of 2 features: ‖[[3,4],[0,0]] + 1e-8‖_F = 5, ‖[[6,8],[1,0]] + 1e-8‖_F = √101; · √2
    np.testing.assert_allclose(
        penalty({"params": params}, layer_dim=2), (5 + math.sqrt(101)) * math.sqrt(2), rtol=1e-6
    )
    with pytest.raises(ValueError, match="multiple of layer_dim=3"):
        probes.group_lasso_penalty(params, layer_dim=3)


def test_input_shape_errors():
    probe = probes.make_probe("cgp", num_classes=3, num_layers=2, dim=8, num_prototypes=4)
    params = {"params": _random_params(probe)}
    with pytest.raises(
        ValueError, match=r"expected patches \[L=2, B, T, F, D=8\], found shape \(3, 1, 2, 8, 8\)"
    ):
        probe.apply(params, jnp.zeros((2, 1, 8)), jnp.zeros((3, 1, 2, 8, 8)))
    with pytest.raises(ValueError, match="unknown probe 'mlp'"):
        probes.make_probe("mlp", 3, 2, 8)
    with pytest.raises(TypeError, match="no field"):
        probes.make_probe("lp", 3, 2, 8, num_prototypes=4)


def test_bf16_inputs_are_computed_in_float32(heads, feats):
    probe, params = _reference_probe(heads, "cgp")
    cls, patches = feats["short"]
    cls16, patches16 = jnp.asarray(cls, jnp.bfloat16), jnp.asarray(patches, jnp.bfloat16)
    apply = jax.jit(probe.apply)
    out = apply({"params": params}, cls16, patches16)
    exact = apply({"params": params}, cls16.astype(jnp.float32), patches16.astype(jnp.float32))
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, exact)
    probe16, _ = _reference_probe(heads, "cgp", dtype=jnp.bfloat16)
    out16 = jax.jit(probe16.apply)({"params": params}, cls16, patches16)
    assert out16.dtype == jnp.float32 and _rel_err(out16, heads["cgp__logits"]) < 0.05


def test_logical_axes_and_sharded_apply(heads, feats):
    probe, params = _reference_probe(heads, "cgp")
    axes = probes.param_logical_axes(probe)
    assert axes["prototypes"] == jax.sharding.PartitionSpec("prototypes", "embed")
    assert axes["gate_logits"] == jax.sharding.PartitionSpec("layers")
    assert axes["fc"]["kernel"] == jax.sharding.PartitionSpec("features", "classes")
    mesh = jax.make_mesh((8,), ("model",), (jax.sharding.AxisType.Auto,), devices=jax.devices()[:8])
    rules = (("prototypes", "model"), ("features", "model"))
    shardings = nn.logical_to_mesh_sharding(axes, mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert sharded["prototypes"].sharding.spec == jax.sharding.PartitionSpec("model", None)
    cls, patches = feats["short"]
    with nn.logical_axis_rules(rules):
        out = jax.jit(probe.apply)({"params": sharded}, cls, patches)
    assert _rel_err(out, heads["cgp__logits"]) <= PARITY_TOL


def test_cgp_trains_and_gate_moves_to_informative_layer():
    num_layers, dim, classes, informative, steps = 4, 16, 3, 2, 100
    rng = np.random.default_rng(0)
    means = 3.0 * rng.normal(size=(classes, dim))

    def make_data(n):
        y = rng.integers(0, classes, n)
        cls = rng.normal(size=(num_layers, n, dim))
        patches = rng.normal(size=(num_layers, n, 2, 4, dim))
        cls[informative] += means[y]  # class information only at one layer
        patches[informative] += means[y][:, None, None, :]
        return jnp.asarray(cls, jnp.float32), jnp.asarray(patches, jnp.float32), jnp.asarray(y)

    (cls, patches, y), test = make_data(96), make_data(96)
    probe = probes.make_probe("cgp", classes, num_layers, dim, num_prototypes=16, dropout_rate=0.0)
    tx = optax.adamw(1e-2, weight_decay=0.05)

    @jax.jit
    def train(key):
        params = nn.unbox(probes.init_params(probe, key))

        def step(i, state):
            params, opt_state = state

            def loss_fn(p):
                return losses.softmax_cross_entropy(probe.apply({"params": p}, cls, patches), y)

            updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return jax.lax.fori_loop(0, steps, step, (params, tx.init(params)))[0]

    params = train(_key(0))
    logits = jax.jit(probe.apply)({"params": params}, *test[:2])
    accuracy = float(jnp.mean(jnp.argmax(logits, -1) == test[2]))
    gates = probes.layer_gates(params)
    assert accuracy >= 0.9, accuracy
    assert int(jnp.argmax(gates)) == informative and float(gates[informative]) > 1 / num_layers + 0.05, gates


# ----------------------------------------------------------------------------------------------------
# Losses, against direct numpy transcriptions (float64)


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _np_asymmetric(x, y, gamma_neg, gamma_pos, clip, eps=1e-8):
    p = _np_sigmoid(x)
    p_neg = np.minimum(1 - p + clip, 1) if clip > 0 else 1 - p
    loss = y * np.log(np.maximum(p, eps)) + (1 - y) * np.log(np.maximum(p_neg, eps))
    if gamma_neg > 0 or gamma_pos > 0:
        p_t = p * y + p_neg * (1 - y)
        loss = loss * (1 - p_t) ** (gamma_pos * y + gamma_neg * (1 - y))
    return -loss.mean()


@pytest.fixture(scope="module")
def multilabel():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 7)).astype(np.float32)
    logits[0, :3] = [25.0, -25.0, 0.0]  # saturated sigmoids exercise the eps clamp
    targets = (rng.random((6, 7)) < 0.3).astype(np.float32)
    return logits, targets


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(1.0, 0.0, 0.0), (4.0, 1.0, 0.05), (0.0, 0.0, 0.0)])
def test_asymmetric_loss_matches_numpy(multilabel, gamma_neg, gamma_pos, clip):
    x, y = multilabel
    got = losses.asymmetric_loss(
        jnp.asarray(x), jnp.asarray(y), gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip
    )
    np.testing.assert_allclose(
        got, _np_asymmetric(x.astype(np.float64), y, gamma_neg, gamma_pos, clip), rtol=1e-5
    )


def test_asymmetric_loss_focus_weight_is_constant_for_the_gradient(multilabel):
    x, y = (a[1:] for a in multilabel)  # moderate logits: no clamps active
    grad = jax.jit(jax.grad(lambda v: losses.asymmetric_loss(v, jnp.asarray(y))))(jnp.asarray(x))
    p = _np_sigmoid(x.astype(np.float64))
    weight = np.where(y > 0, 1.0, p)  # (1 − p_t)^γ with γ₊ = 0, γ₋ = 1
    np.testing.assert_allclose(grad, -weight * (y - p) / x.size, rtol=1e-4, atol=1e-8)


def test_bce_with_logits_matches_numpy(multilabel):
    x, y = multilabel
    x64 = np.clip(x.astype(np.float64), -20, 20)
    ref = -(y * np.log(_np_sigmoid(x64)) + (1 - y) * np.log(1 - _np_sigmoid(x64))).mean()
    np.testing.assert_allclose(
        losses.bce_with_logits(jnp.asarray(np.clip(x, -20, 20)), jnp.asarray(y)), ref, rtol=1e-5
    )
    assert losses.bce_with_logits(jnp.asarray(x), jnp.asarray(y), reduction="none").shape == x.shape


def test_softmax_cross_entropy_matches_numpy(multilabel):
    x, _ = multilabel
    labels = np.array([0, 3, 6, 2, 2, 5])
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(6), labels].mean()
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(labels)), nll, rtol=1e-5
    )
    onehot = np.eye(7, dtype=np.float32)[labels]
    np.testing.assert_allclose(
        losses.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(onehot)), nll, rtol=1e-5
    )
    smoothed = 0.9 * nll + 0.1 * (-logp.mean(-1)).mean()  # torch label_smoothing=0.1
    got = losses.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(labels), label_smoothing=0.1)
    np.testing.assert_allclose(got, smoothed, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        losses.softmax_cross_entropy(jnp.asarray(x), jnp.asarray(labels), reduction="avg")
