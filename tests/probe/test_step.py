"""The probes' jitted step on a frozen stand-in encoder (issue 8 §2, §5).

The stand-in encoder's "spec" is the layer features themselves, so the tests control exactly which layer
carries the label: planted information, the weight-decay mask, sweeps as a vmapped axis, one forward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.probe import heads as heads_lib
from bat_jax.probe import step as step_lib
from bat_jax.train.config import load

L, D, T, F, C = 4, 16, 2, 2, 4  # layers, width, time and frequency patches, classes


def _cfg(**train):
    c = load("configs/probe/base.py")
    c.probe.num_prototypes = 32
    c.probe.dropout_rate = 0.0
    c.optim.warmup_steps = 10
    c.optim.peak_lr = 3e-2
    c.train.steps = 200
    for key, value in train.items():
        c.train[key] = value
    return c


def stand_in(params, spec):
    """A frozen 'encoder' that returns the features carried by the batch."""
    del params
    return spec["cls"], spec["patches"]


def planted_batch(rng, k, batch, means):
    """Layer k = class mean + noise (CLS and patches); every other layer pure noise."""
    labels = rng.integers(0, C, batch)
    cls = rng.normal(size=(L, batch, D)).astype(np.float32)
    patches = rng.normal(size=(L, batch, T, F, D)).astype(np.float32)
    cls[k] = means[labels] + 0.3 * rng.normal(size=(batch, D))
    patches[k] = means[labels][:, None, None] + 0.3 * rng.normal(size=(batch, T, F, D))
    onehot = np.eye(C, dtype=np.float32)[labels]
    return {"spec": {"cls": jnp.asarray(cls), "patches": jnp.asarray(patches)}, "labels": jnp.asarray(onehot)}


def _train(cfg, names, batches, members=None):
    heads = heads_lib.build(names, cfg, C, L, D)
    members = members or heads_lib.members(cfg)
    tx = heads_lib.optimizer(
        cfg, jax.eval_shape(lambda k: step_lib.init_params_of(heads, k), jax.random.key(0))
    )
    state = step_lib.init_state(heads, tx, members)
    train = step_lib.jit_train_step(stand_in, heads, tx, heads_lib.loss_fn("cross_entropy"), cfg)
    for batch in batches:
        state, _ = train(state, None, batch)
    return heads, state, train


def _accuracy(heads, state, batch):
    logits = step_lib.jit_eval_step(stand_in, heads)(state.params, None, batch)
    y = np.argmax(np.asarray(batch["labels"]), -1)
    # per-layer probes give [S, L, B, C]: an accuracy per layer
    return {name: np.mean(np.argmax(np.asarray(v[0]), -1) == y, axis=-1) for name, v in logits.items()}


@pytest.mark.parametrize("k", [1, 2])
def test_cgp_gate_finds_the_planted_layer_while_the_last_layer_probe_stays_at_chance(k):
    rng = np.random.default_rng(k)
    means = rng.normal(size=(C, D)).astype(np.float32)
    cfg = _cfg(steps=200)
    cfg.per_layer_lp = True
    heads, state, _ = _train(cfg, ("cgp", "lp"), (planted_batch(rng, k, 32, means) for _ in range(200)))
    test = planted_batch(np.random.default_rng(100 + k), k, 512, means)
    acc = _accuracy(heads, state, test)
    gate = np.asarray(step_lib.gates(state.params, ["cgp"])["cgp"][0])
    assert np.argmax(gate) == k, gate
    assert gate[k] > 2.0 / L, gate  # well above uniform (1/L)
    assert acc["cgp"] >= 0.95, acc  # near-perfect
    assert acc["lp"] <= 1.0 / C + 0.1, acc  # the last layer carries no label: chance (1/C = 0.25)
    # the per-layer linear probes: layer k near-perfect, every other layer at chance (the curve CGP's gate
    # is compared with)
    per_layer = acc["per_layer_lp"]
    assert per_layer.shape == (L,) and per_layer[k] >= 0.95, per_layer
    assert all(per_layer[j] <= 1.0 / C + 0.1 for j in range(L) if j != k), per_layer


def test_weight_decay_only_on_linear_weights():
    from bat_jax.models.config import EncoderConfig

    cfg = _cfg()
    names = ("cgp", "lcgp", "h2t", "lp", "protobin", "vqt")
    heads = heads_lib.build(names, cfg, C, L, D, EncoderConfig(dim=D, depth=L, num_heads=2))
    params = step_lib.init_params_of(heads, jax.random.key(0))
    mask = heads_lib.decay_mask(params)
    flat = {heads_lib._path(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert {p for p, v in flat.items() if v} == {f"{n}/fc/kernel" for n in names}
    no_decay = {"cgp/gate_logits", "cgp/prototypes", "cgp/fc/bias", "lcgp/ln/scale", "protobin/prototypes"}
    assert no_decay | {"vqt/query_tokens"} <= {p for p, v in flat.items() if not v}
    # AdamW with zero gradients: only the decayed weights move (by lr * wd * w).
    tx = heads_lib.optimizer(cfg, params)
    opt = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, opt, params)
    moved = {
        heads_lib._path(p): bool(jnp.any(u != 0)) for p, u in jax.tree_util.tree_flatten_with_path(updates)[0]
    }
    assert moved == flat


def test_sweep_members_equal_separate_runs_and_the_encoder_runs_once_per_step():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(C, D)).astype(np.float32)
    batches = [planted_batch(rng, 1, 16, means) for _ in range(12)]
    cfg = _cfg(steps=12, sweep_lrs="0.01,0.003", sweep_seeds="0,5")
    members = heads_lib.members(cfg)
    assert [m["label"] for m in members] == [
        "lr=0.01,seed=0",
        "lr=0.01,seed=5",
        "lr=0.003,seed=0",
        "lr=0.003,seed=5",
    ]
    calls = []

    def counting(params, spec):
        calls.append(1)
        return stand_in(params, spec)

    names = ("cgp", "lcgp", "lp")
    heads = heads_lib.build(names, cfg, C, L, D)
    tx = heads_lib.optimizer(
        cfg, jax.eval_shape(lambda k: step_lib.init_params_of(heads, k), jax.random.key(0))
    )
    train = step_lib.jit_train_step(counting, heads, tx, heads_lib.loss_fn("cross_entropy"), cfg)
    state = step_lib.init_state(heads, tx, members)
    for batch in batches:
        state, _ = train(state, None, batch)
    assert len(calls) == 1  # traced once: one forward for 3 probes x 4 members, no recompiles
    assert train._cache_size() == 1
    # Each member alone (S = 1; one compiled step reused: a member's lr and seed live in its state).
    for m in (0, 3):
        alone = step_lib.init_state(heads, tx, [members[m]])
        for batch in batches:
            alone, _ = train(alone, None, batch)
        for name in names:
            got = jax.tree.map(lambda x, m=m: x[m], state.params[name])
            want = jax.tree.map(lambda x: x[0], alone.params[name])
            err = max(
                float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12))
                for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
            )
            assert err < 1e-5, (members[m], name, err)
    # members differ from each other (the sweep is not one run repeated)
    assert (
        float(jnp.max(jnp.abs(state.params["lp"]["fc"]["kernel"][0] - state.params["lp"]["fc"]["kernel"][2])))
        > 0
    )
