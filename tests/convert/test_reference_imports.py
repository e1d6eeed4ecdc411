"""Reference (PyTorch) layouts other than the encoder's: the SSL student + decoder, the probe heads and
the HF config.json. Parity through these imports is tested with the models
(tests/models/test_ssl_objective.py, tests/models/test_probes.py); here: strictness, non-finite values and
errors."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from bat_jax.convert import (
    CheckpointError,
    decoder_params_from_reference,
    encoder_config_from_hf,
    probe_params_from_reference,
    ssl_params_from_reference,
)
from bat_jax.models import probes
from bat_jax.train.config import ssl_preset

REF_LAYERS, REF_DIM = 3, 64  # the reference profile's encoder depth and width (profile.json)


@pytest.fixture(scope="module")
def ssl_state(golden_dir):
    return load_file(golden_dir / "ssl_case" / "ssl_student.safetensors")


@pytest.fixture(scope="module")
def heads(golden_dir):
    with np.load(golden_dir / "heads.npz") as z:
        return dict(z)


def _ref_arrays(heads, name):
    prefix = name + "__"
    return {k[len(prefix) :]: v for k, v in heads.items() if k.startswith(prefix) and k != prefix + "logits"}


# ----------------------------------------------------------------------------------------------------
# SSL student (moved from tests/models/test_ssl_objective.py)


def test_params_from_reference_is_strict(ssl_state):
    cfg = ssl_preset("tiny")  # the size of the reference SSL fixture
    state = dict(ssl_state)
    missing = {k: v for k, v in state.items() if k != "decoder.mask_token"}
    with pytest.raises(ValueError, match="mask_token"):
        ssl_params_from_reference(missing, cfg, "f.safetensors")
    with pytest.raises(ValueError, match="teacher.x"):
        ssl_params_from_reference({**state, "teacher.x": np.zeros(1)}, cfg, "f.safetensors")
    with pytest.raises(ValueError, match="out_proj.weight"):
        ssl_params_from_reference(
            {**state, "decoder.out_proj.weight": np.zeros((64, 32), np.float32)}, cfg, "f.safetensors"
        )


def test_ssl_import_refuses_non_finite_weights(ssl_state):
    cfg = ssl_preset("tiny")
    state = dict(ssl_state)
    table = state["decoder.pos_embed"].copy()
    table[0, 2, :3] = np.inf
    with pytest.raises(CheckpointError, match=r"f\.safetensors \(decoder\.\*\).*'pos_embed' \(3 of"):
        ssl_params_from_reference({**state, "decoder.pos_embed": table}, cfg, "f.safetensors")
    weight = state["encoder.blocks.0.attn.qkv.weight"].copy()
    weight[0, 0] = np.nan
    with pytest.raises(CheckpointError, match=r"\(encoder\.\*\).*'blocks\.0\.attn\.qkv\.weight' \(1 of"):
        ssl_params_from_reference({**state, "encoder.blocks.0.attn.qkv.weight": weight}, cfg, "f.safetensors")


def test_decoder_import_gives_float32_params(ssl_state):
    cfg = ssl_preset("tiny").decoder
    state = {
        k[len("decoder.") :]: v.astype(np.float16) for k, v in ssl_state.items() if k.startswith("decoder.")
    }
    params = decoder_params_from_reference(state, cfg, "f.safetensors")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(params["mask_token"], state["mask_token"].reshape(-1).astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# Probe heads (moved from tests/models/test_probes.py)


def test_from_reference_errors_name_key_and_shapes(heads):
    arrays = _ref_arrays(heads, "cgp")
    bad = {**arrays, "fc.weight": arrays["fc.weight"][:, :90]}
    with pytest.raises(ValueError, match=r"'fc.weight'.*\(5, 90\).*\(5, 96\)"):
        probe_params_from_reference("cgp", bad)
    probe = probes.make_probe("cgp", 5, num_layers=REF_LAYERS + 1, dim=REF_DIM, num_prototypes=32)
    like = jax.eval_shape(lambda: probes.init_params(probe, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"'block_attention'.*\(3,\).*\(4,\)"):
        probe_params_from_reference("cgp", arrays, like=like)
    with pytest.raises(CheckpointError, match="missing \\['prototype_vectors'\\]"):
        probe_params_from_reference("protobin", {k: v for k, v in arrays.items() if k != "prototype_vectors"})
    prefixed = {"head." + k: v for k, v in _ref_arrays(heads, "lp").items()}
    assert set(probe_params_from_reference("lp", prefixed, prefix="head.")) == {"fc", "ln"}


def test_probe_import_key_errors_are_checkpoint_errors_on_one_plain_line(heads):
    # Every probe-import error is a CheckpointError (not a KeyError, whose str() is quoted).
    lp = _ref_arrays(heads, "lp")
    cases = [  # (name, arrays, like, expected message)
        ("nope", lp, None, r"unknown probe 'nope'"),
        ("lp", {**lp, "extra": lp["fc.bias"]}, None, r"unexpected \['extra'\]"),
        ("lp", {k: v for k, v in lp.items() if k != "ln.bias"}, None, r"needs both ln\.weight and ln\.bias"),
    ]
    probe = probes.make_probe("lp", lp["fc.bias"].shape[0], num_layers=1, dim=REF_DIM, use_norm=False)
    no_norm = jax.eval_shape(lambda: probes.init_params(probe, jax.random.key(0)))
    cases.append(("lp", lp, no_norm, r"LayerNorm present in one and not the other"))
    for name, arrays, like, message in cases:
        with pytest.raises(CheckpointError, match=message) as info:
            probe_params_from_reference(name, arrays, like=like, where="head.pt")
        assert str(info.value).startswith("head.pt (bat_jax/convert/probes.py): ")


def test_probe_import_refuses_non_finite_weights(heads):
    arrays = _ref_arrays(heads, "cgp")
    gates = arrays["block_attention"].copy()
    gates[1] = np.nan
    with pytest.raises(CheckpointError, match=r"head\.pt .*'head\.block_attention' \(1 of 3 values\)"):
        probe_params_from_reference(
            "cgp",
            {"head." + k: v for k, v in {**arrays, "block_attention": gates}.items()},
            prefix="head.",
            where="head.pt",
        )


# ----------------------------------------------------------------------------------------------------
# HF config.json


def test_encoder_config_from_hf(golden_dir):
    hf = json.loads((golden_dir / "bat_encoder" / "config.json").read_text())
    cfg = encoder_config_from_hf(hf)
    assert (cfg.dim, cfg.depth, cfg.num_heads, cfg.use_gate, cfg.patch_size) == (64, 3, 4, True, (16, 16))
    with pytest.raises(CheckpointError, match=r"c\.json: missing \['num_attention_heads'\]"):
        encoder_config_from_hf({k: v for k, v in hf.items() if k != "num_attention_heads"}, "c.json")
    with pytest.raises(CheckpointError, match="c.json: pos_trainable is true"):
        encoder_config_from_hf({**hf, "pos_trainable": True}, "c.json")
    with pytest.raises(CheckpointError, match=r"c\.json: not a valid BAT encoder config .*divisible"):
        encoder_config_from_hf({**hf, "num_attention_heads": 5}, "c.json")
