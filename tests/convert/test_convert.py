"""Weight import: parity with the reference PyTorch encoder, strict checks, and the convert round trip."""

import argparse
import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bat_jax.convert import cli as convert_cli
from bat_jax.convert import load_encoder, load_weights, save_encoder
from bat_jax.models.config import POS_GRID_EAT
from bat_jax.models.layers import sincos_2d
from tests.convert.helpers import check_parity, hf_folder, rel

# ----------------------------------------------------------------------------------------------------
# Parity with the reference outputs


@pytest.mark.parametrize("source", ["folder", "safetensors", "pt"])
def test_bat_parity(bat_dir, bat_golden, source):
    path = {
        "folder": bat_dir,
        "safetensors": bat_dir / "model.safetensors",
        "pt": bat_dir / "BAT_base_style.pt",
    }
    enc = load_encoder(path[source])
    assert (enc.config.dim, enc.config.depth, enc.config.num_heads, enc.config.use_gate) == (64, 3, 4, True)
    check_parity(enc, bat_golden)


def test_eat_parity(golden_dir):
    enc = load_encoder(golden_dir / "eat_encoder" / "checkpoint.pt", num_heads=4)
    assert not enc.config.use_gate and enc.config.num_heads == 4
    check_parity(enc, dict(np.load(golden_dir / "eat_encoder" / "golden.npz")))


def test_all_formats_give_the_same_params(bat_dir):
    _, want, kind = load_weights(bat_dir)
    assert kind == "hf"
    for path, kind_want in ((bat_dir / "model.safetensors", "hf"), (bat_dir / "BAT_base_style.pt", "bat_pt")):
        _, got, kind = load_weights(path)
        assert kind == kind_want
        jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bfloat16_load(bat_dir, bat_golden):
    enc = load_encoder(bat_dir, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(enc.params))
    out = enc(bat_golden["spec_short"])
    assert out.cls.dtype == jnp.bfloat16
    assert rel(np.asarray(out.cls, np.float32), bat_golden["cls_short"]) < 5e-2


# ----------------------------------------------------------------------------------------------------
# Number of heads


def test_heads_from_file_or_argument(tmp_path, golden_dir, bat_dir):
    eat = golden_dir / "eat_encoder" / "checkpoint.pt"
    assert load_weights(eat)[0].num_heads == 4  # the fairseq checkpoint's stored model config
    with pytest.raises(ValueError, match="num_heads=8 was passed but its stored model config says 4"):
        load_weights(eat, num_heads=8)
    # Without its config, a fairseq checkpoint does not say how many heads.
    bare = tmp_path / "bare_eat.pt"
    torch.save({"model": torch.load(eat, weights_only=True)["model"]}, bare)
    with pytest.raises(ValueError, match="does not say how many attention heads.*pass num_heads"):
        load_weights(bare)
    assert load_weights(bare, num_heads=4)[0].num_heads == 4
    # Older fairseq checkpoints pickle an argparse Namespace: read with weights_only=False, heads from it.
    with_args = tmp_path / "args_eat.pt"
    torch.save(
        {"model": torch.load(eat, weights_only=True)["model"], "args": argparse.Namespace(num_heads=4)},
        with_args,
    )
    assert load_weights(with_args)[0].num_heads == 4
    # A BAT .pt without a config.json beside it needs num_heads too.
    lone = tmp_path / "BAT.pt"
    shutil.copy(bat_dir / "BAT_base_style.pt", lone)
    with pytest.raises(ValueError, match="does not say how many attention heads"):
        load_weights(lone)
    _, got, _ = load_weights(lone, num_heads=4)
    jax.tree.map(np.testing.assert_array_equal, got, load_weights(bat_dir)[1])
    with pytest.raises(ValueError, match="num_heads=2 was passed but its config.json says 4"):
        load_weights(bat_dir, num_heads=2)


# ----------------------------------------------------------------------------------------------------
# Strict import: shapes, missing and unexpected keys


def test_wrong_shape_names_key_and_shapes(tmp_path, bat_dir, bat_state):
    state = dict(bat_state)
    state["blocks.1.mlp.fc1.weight"] = np.zeros((128, 64), np.float32)
    folder = hf_folder(tmp_path, state, src_config=bat_dir / "config.json")
    with pytest.raises(
        ValueError, match=r"'blocks\.1\.mlp\.fc1\.weight' has shape \[128, 64\], expected \[256, 64\]"
    ):
        load_encoder(folder)


def test_config_disagreeing_with_tensors(tmp_path, bat_dir, bat_state):
    folder = hf_folder(tmp_path, dict(bat_state), {"hidden_size": 96}, src_config=bat_dir / "config.json")
    with pytest.raises(ValueError, match=r"has shape \[64, 1, 16, 16\], expected \[96, 1, 16, 16\]"):
        load_encoder(folder)


def test_missing_and_unexpected_keys(tmp_path, bat_dir, bat_state):
    state = dict(bat_state)
    del state["blocks.2.attn.gate.bias"]
    state["blocks.0.attn.extra.weight"] = np.zeros(3, np.float32)
    folder = hf_folder(tmp_path, state, src_config=bat_dir / "config.json")
    with pytest.raises(ValueError) as err:
        load_encoder(folder)
    assert "missing keys: blocks.2.attn.gate.bias" in str(err.value)
    assert "unexpected keys: blocks.0.attn.extra.weight" in str(err.value)
    assert str(folder / "model.safetensors") in str(err.value)


def test_gate_keys_unexpected_for_an_ungated_config(tmp_path, bat_dir, bat_state):
    folder = hf_folder(tmp_path, dict(bat_state), {"use_gate": False}, src_config=bat_dir / "config.json")
    with pytest.raises(ValueError, match=r"unexpected keys: blocks\.0\.attn\.gate\.bias"):
        load_encoder(folder)


def test_learned_positions_are_rejected(tmp_path, bat_dir, bat_state):
    state = dict(bat_state)
    state["pos_embed"] = np.random.default_rng(0).normal(size=(1, 512, 64)).astype(np.float32)
    folder = hf_folder(tmp_path, state, src_config=bat_dir / "config.json")
    with pytest.raises(ValueError, match="'pos_embed' is not a fixed 2-D sin-cos position table"):
        load_encoder(folder)


def test_eat_layout_position_table_is_recognised(tmp_path, golden_dir):
    # Released EAT/SSLAM checkpoints store the (time 64, freq 8) grid table; the reference uses it as is.
    eat = golden_dir / "eat_encoder" / "checkpoint.pt"
    model = torch.load(eat, weights_only=True)["model"]
    table = sincos_2d(64, POS_GRID_EAT)[None]  # [1, 512, 64]
    model["modality_encoders.IMAGE.fixed_positional_encoder.positions"] = torch.from_numpy(table)
    path = tmp_path / "eat_layout.pt"
    torch.save({"model": model}, path)
    enc = load_encoder(path, num_heads=4)
    assert enc.config.pos_grid == POS_GRID_EAT
    positions = enc.module.apply({"params": enc.params}, 512, method="positions")
    np.testing.assert_allclose(positions, table[0], atol=1e-6)


def test_unrecognised_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_encoder(tmp_path / "nothing.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="not a recognised encoder checkpoint"):
        load_encoder(tmp_path / "weights.npz")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a BAT or EAT/SSLAM checkpoint"):
        load_encoder(tmp_path / "other.pt")


def test_missing_torch_message(monkeypatch, bat_dir):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'bat-jax\[torch\]'"):
        load_encoder(bat_dir / "BAT_base_style.pt")
    load_weights(bat_dir)  # safetensors needs no torch


# ----------------------------------------------------------------------------------------------------
# bat-jax checkpoints and the convert command


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="bat-jax")
    convert_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_convert_roundtrip(tmp_path, bat_dir, bat_golden, capsys):
    out = tmp_path / "converted"
    assert run_cli(["convert", str(bat_dir / "BAT_base_style.pt"), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "params").is_dir()
    assert "dim 64, depth 3, heads 4" in capsys.readouterr().out
    src, back = load_encoder(bat_dir / "BAT_base_style.pt"), load_encoder(out)
    assert back.config == src.config
    jax.tree.map(np.testing.assert_array_equal, back.params, src.params)
    x = bat_golden["spec_short"]
    a, b = src(x), back(x)
    np.testing.assert_array_equal(a.cls, b.cls)
    np.testing.assert_array_equal(a.patches, b.patches)
    # Writing over an existing checkpoint needs --overwrite.
    assert run_cli(["convert", str(bat_dir), str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert run_cli(["convert", str(bat_dir), str(out), "--overwrite"]) == 0


def test_convert_eat_keeps_its_architecture(tmp_path, golden_dir):
    src, out = golden_dir / "eat_encoder" / "checkpoint.pt", tmp_path / "eat"
    assert run_cli(["convert", str(src), str(out), "--num-heads", "4"]) == 0
    config, params, kind = load_weights(out)
    assert kind == "bat_jax" and not config.use_gate and config.num_heads == 4
    jax.tree.map(np.testing.assert_array_equal, params, load_weights(src)[1])


def test_own_checkpoint_mismatch_is_an_error(tmp_path, bat_dir):
    out = save_encoder(load_encoder(bat_dir), tmp_path / "ckpt")
    meta = json.loads((out / "config.json").read_text())
    meta["config"]["mlp_ratio"] = 2.0
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'blocks_0/mlp/fc1/bias' has shape \[256\], expected \[128\]"):
        load_encoder(out)


def test_convert_help_explains_inputs_and_layout(capsys):
    with pytest.raises(SystemExit):
        run_cli(["convert", "--help"])
    text = capsys.readouterr().out
    words = ("model.safetensors", "student.encoder", "fairseq", "--num-heads", "OUT/params/", "config.json")
    for word in words:
        assert word in text
