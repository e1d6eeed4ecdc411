"""Compile options for inference-heavy jitted functions (bat_jax/models/xla_options.py): on CPU a float32
frozen encoder's forward and the probe steps compile without YNNPACK fusions (faster there,
benchmarks/RESULTS.md) and give the same values; a bfloat16 encoder's run its dots alone in YNNPACK (its bf16
kernels); a user's own XLA_FLAGS choice, other backends, and an XLA that does not know the option leave XLA's
defaults."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.models import xla_options
from bat_jax.models.config import PRESETS
from bat_jax.models.encoder import FrozenEncoder, jitted_apply
from bat_jax.probe import heads as heads_lib
from bat_jax.probe import step as step_lib
from bat_jax.train.config import load

YNN = "%ynn_fusion"  # the name XLA gives a YNNPACK fusion instruction in the compiled HLO text


@pytest.fixture
def fresh(monkeypatch):
    """`inference` recomputed (it is cached per process) under the test's environment."""
    xla_options._inference.cache_clear()
    yield monkeypatch
    xla_options._inference.cache_clear()


def test_cpu_gets_no_ynn_fusions_unless_the_user_chose(fresh):
    fresh.delenv("XLA_FLAGS", raising=False)
    assert xla_options.inference("cpu") == xla_options.NO_YNN_FUSIONS
    assert xla_options.inference("gpu") is None and xla_options.inference("tpu") is None
    assert xla_options.inference("cpu", encoder_dtype=jnp.float32) == xla_options.NO_YNN_FUSIONS
    assert xla_options.inference("cpu", encoder_dtype="bfloat16") == xla_options.YNN_DOTS_ONLY
    assert xla_options.inference("cpu", encoder_dtype=jnp.bfloat16) == xla_options.YNN_DOTS_ONLY
    assert xla_options.inference("tpu", encoder_dtype=jnp.bfloat16) is None
    xla_options._inference.cache_clear()
    fresh.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    assert xla_options.inference("cpu") is None  # the user's XLA_FLAGS win


def test_an_option_this_xla_refuses_means_defaults(fresh):
    fresh.delenv("XLA_FLAGS", raising=False)
    fresh.setattr(xla_options, "NO_YNN_FUSIONS", {"xla_cpu_no_such_option": ""})
    assert xla_options.inference("cpu") is None


def test_frozen_forward_compiles_without_ynn_fusions_and_same_values():
    enc = FrozenEncoder.random(PRESETS["tiny"]())
    spec = jax.random.normal(jax.random.key(1), (2, 64, enc.config.n_mels))
    ours = jitted_apply(enc.config)
    default = jax.jit(lambda p, s: enc.module.apply({"params": p}, s), compiler_options={})
    text = ours.lower(enc.params, spec).compile().as_text()
    assert YNN not in text
    # the premise: XLA's defaults here do fuse into YNNPACK kernels (else the option would be moot)
    assert YNN in default.lower(enc.params, spec).compile().as_text()
    for a, b in zip(ours(enc.params, spec), default(enc.params, spec), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_probe_steps_use_the_options_and_an_empty_dict_keeps_defaults():
    enc_cfg = PRESETS["tiny"]()
    cfg = load("configs/probe/base.py")
    cfg.probe.num_prototypes, cfg.optim.warmup_steps = 8, 1
    heads = heads_lib.build(("cgp", "lp"), cfg, 3, enc_cfg.depth, enc_cfg.dim)
    tx = heads_lib.optimizer(
        cfg, jax.eval_shape(lambda k: step_lib.init_params_of(heads, k), jax.random.key(0))
    )
    loss = heads_lib.loss_fn("cross_entropy")
    forward = step_lib.encoder_forward(enc_cfg)
    enc = FrozenEncoder.random(enc_cfg)
    batch = {"spec": jnp.zeros((2, 64, enc_cfg.n_mels)), "labels": jnp.eye(3)[:2]}
    state = step_lib.init_state(heads, tx, heads_lib.members(cfg))
    texts = {}
    for name, options in (("job", None), ("xla", {})):
        step = step_lib.jit_train_step(forward, heads, tx, loss, cfg, compiler_options=options)
        texts[name] = step.lower(state, enc.params, batch).compile().as_text()
    assert YNN not in texts["job"] and YNN in texts["xla"]
    evaluate = step_lib.jit_eval_step(forward, heads)
    assert YNN not in evaluate.lower(state.params, enc.params, batch).compile().as_text()


def test_a_bfloat16_frozen_forward_runs_dots_in_ynnpack():
    """(Which options, YNN_DOTS_ONLY, is `test_cpu_gets_no_ynn_fusions_unless_the_user_chose`'s.)"""
    enc = FrozenEncoder.random(PRESETS["tiny"](dtype="bfloat16"))
    spec = jax.random.normal(jax.random.key(1), (2, 64, enc.config.n_mels))
    assert YNN in jitted_apply(enc.config).lower(enc.params, spec).compile().as_text()
