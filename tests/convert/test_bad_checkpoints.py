"""Checkpoints that are damaged, stored in half precision or hold NaN/Inf (issue 6, section 1).

Every unreadable input is a CheckpointError (a ValueError) naming the file and the reason, through the API,
and one line on stderr with exit status 1 through `bat-jax convert` (no traceback).
"""

import asyncio
import gc
import json
import logging
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from bat_jax import cli
from bat_jax.convert import CheckpointError, leftover_reads, load_encoder, load_weights, save_encoder
from bat_jax.convert.mapping import pos_tolerance
from bat_jax.models.layers import sincos_2d
from tests.convert.helpers import copy_with_config, hf_folder, parity_errors

HALF = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
TORCH_HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Unit roundoff u of each storage dtype (half an ulp at 1.0): rounding a float32 weight to it moves the
# weight by at most u relatively; the golden encoder's outputs then move by about u (measured: float16
# 4.8e-4, bfloat16 4.1e-3 ‖out − ref‖/‖ref‖). The tolerance is 4u: a wrong layout or transpose is O(1).
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
HALF_TOL = {name: 4 * u for name, u in UNIT_ROUNDOFF.items()}  # float16 1.95e-3, bfloat16 1.56e-2


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def random_bytes(data: bytes) -> bytes:
    return np.random.default_rng(0).bytes(len(data))


DAMAGE = {"truncated": truncated, "random": random_bytes, "empty": lambda data: b""}


def damaged_copy(src, tmp_path, how, config_json):
    """A copy of `src` (with config.json beside it) whose bytes are damaged `how`."""
    dst = copy_with_config(src, tmp_path / how, config_json)
    dst.write_bytes(DAMAGE[how](src.read_bytes()))
    return dst


def half_state(state, dtype_name):
    return {k: v.astype(HALF[dtype_name]) for k, v in state.items()}


def half_pt(bat_dir, folder, dtype_name):
    """The golden BAT .pt with every tensor stored as `dtype_name`, config.json beside it."""
    obj = torch.load(bat_dir / "BAT_base_style.pt", weights_only=True)
    obj["state_dict"] = {k: v.to(TORCH_HALF[dtype_name]) for k, v in obj["state_dict"].items()}
    path = copy_with_config(bat_dir / "BAT_base_style.pt", folder, bat_dir / "config.json")
    torch.save(obj, path)
    return path


# ----------------------------------------------------------------------------------------------------
# A truncated or random file


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_safetensors_names_the_file(tmp_path, bat_dir, how):
    path = damaged_copy(bat_dir / "model.safetensors", tmp_path, how, bat_dir / "config.json")
    for src in (path, path.parent):  # the file, and its HF folder
        with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
            load_encoder(src)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_torch_file_names_the_file(tmp_path, bat_dir, how):
    path = damaged_copy(bat_dir / "BAT_base_style.pt", tmp_path, how, bat_dir / "config.json")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        load_encoder(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert "Weights only load failed" not in str(err.value)  # torch's paragraph cut to its reason


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory, bat_dir):
    return save_encoder(load_encoder(bat_dir), tmp_path_factory.mktemp("own") / "ckpt")


def _copy_own(own_checkpoint, tmp_path):
    import shutil

    return shutil.copytree(own_checkpoint, tmp_path / "ckpt")


def test_damaged_own_checkpoint_names_the_folder(tmp_path, own_checkpoint):
    folder = _copy_own(own_checkpoint, tmp_path)
    manifest = folder / "params" / "manifest.ocdbt"
    manifest.write_bytes(random_bytes(manifest.read_bytes()))
    with pytest.raises(CheckpointError, match="cannot restore the Orbax params checkpoint") as err:
        load_encoder(folder)
    assert str(folder / "params") in str(err.value) and "\n" not in str(err.value)


def test_failed_own_restore_leaves_the_unraisable_hook_as_it_was(tmp_path, own_checkpoint, monkeypatch):
    # A library call must not install a process-wide sys.unraisablehook (it used to, for good), and the
    # in-flight TensorStore reads of the failed restore report while its own filter is still in place.
    folder = _copy_own(own_checkpoint, tmp_path)
    manifest = folder / "params" / "manifest.ocdbt"
    manifest.write_bytes(random_bytes(manifest.read_bytes()))
    reports = []
    monkeypatch.setattr(sys, "unraisablehook", reports.append)
    with pytest.raises(CheckpointError, match="cannot restore the Orbax params checkpoint"):
        load_encoder(folder)
    assert sys.unraisablehook == reports.append
    assert reports == []


def _unraisable(exc):
    return types.SimpleNamespace(exc_value=exc, exc_type=type(exc), exc_traceback=exc.__traceback__)


def test_undeliverable_reads_dropped_filters_exactly_those_reports():
    def call_soon_threadsafe():  # the asyncio frame an undeliverable TensorStore read raises from
        raise RuntimeError("Event loop is closed")

    try:
        call_soon_threadsafe()
    except RuntimeError as e:
        undeliverable = e
    other = RuntimeError("Event loop is closed")  # same text, raised elsewhere: reported
    seen = []
    before = sys.unraisablehook
    sys.unraisablehook = seen.append
    try:
        with leftover_reads.reads_dropped("/nowhere"):
            sys.unraisablehook(_unraisable(undeliverable))
            sys.unraisablehook(_unraisable(other))
        assert sys.unraisablehook == seen.append
    finally:
        sys.unraisablehook = before
    assert [u.exc_value for u in seen] == [other]


def _unretrieved_read_future(text):
    """A failed future nobody awaited, held only by a reference cycle: asyncio reports it ("Future
    exception was never retrieved") on the `asyncio` logger when the garbage collector finalizes it."""
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(ValueError(text))
    cycle = [future]
    cycle.append(cycle)
    loop.close()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.seen = []

    def emit(self, record):
        self.seen.append(str(record.exc_info[1]))


def test_failed_restore_collects_and_drops_its_unretrieved_reads(tmp_path):
    # A failed restore's reads that nobody awaited are finalized inside the scope (gc on the failure
    # path), so their reports are dropped there instead of printing at some later collection or at exit;
    # the same report about another folder, or after the scope, reaches the handlers.
    where = str(tmp_path / "params")
    ours = f'DATA_LOSS: Error reading "cls_token/.zarray" at local file "{where}/" [tensorstore_spec=...]'
    other = 'DATA_LOSS: Error reading "x/.zarray" at local file "/elsewhere/params/" [tensorstore_spec=...]'
    records = _Records()
    logger = logging.getLogger("asyncio")
    logger.addHandler(records)
    gc.collect()
    gc.disable()  # only the scope's own collection may finalize the futures below
    try:
        with pytest.raises(RuntimeError, match="restore failed"):
            with leftover_reads.reads_dropped(where):
                _unretrieved_read_future(ours)
                _unretrieved_read_future(other)
                raise RuntimeError("restore failed")
        assert records.seen == [other]
        _unretrieved_read_future(ours)  # after the scope: reported
        gc.collect()
        assert records.seen == [other, ours]
        assert not logger.filters
    finally:
        gc.enable()
        logger.removeHandler(records)


def test_unreadable_own_config_names_the_file(tmp_path, own_checkpoint):
    folder = _copy_own(own_checkpoint, tmp_path)
    (folder / "config.json").write_bytes(truncated((folder / "config.json").read_bytes()))
    with pytest.raises(CheckpointError, match="cannot read the config.json of this bat-jax") as err:
        load_encoder(folder)
    assert str(folder / "config.json") in str(err.value)


def test_unreadable_hf_config_names_the_file(tmp_path, bat_dir, bat_state):
    folder = hf_folder(tmp_path, dict(bat_state), src_config=bat_dir / "config.json")
    (folder / "config.json").write_bytes(b"\xe9\x00 not json")
    with pytest.raises(CheckpointError, match="cannot read the encoder config.json") as err:
        load_encoder(folder)
    assert str(folder / "config.json") in str(err.value)


# ----------------------------------------------------------------------------------------------------
# float16 / bfloat16 checkpoints


@pytest.mark.parametrize("dtype_name", sorted(HALF))
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_half_precision_checkpoint_loads_at_parity(tmp_path, bat_dir, bat_state, bat_golden, fmt, dtype_name):
    if fmt == "safetensors":
        src = hf_folder(tmp_path, half_state(bat_state, dtype_name), src_config=bat_dir / "config.json")
    else:
        src = half_pt(bat_dir, tmp_path / "pt", dtype_name)
    config, params, _ = load_weights(src)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    enc = load_encoder(src)  # float32 compute from the half-precision weights
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(enc.params))
    errors = parity_errors(enc, bat_golden)
    assert max(errors.values()) <= HALF_TOL[dtype_name], errors
    # The stored values are kept exactly: float32 params equal the stored half-precision ones.
    stored = np.asarray(bat_state["blocks.0.mlp.fc1.weight"]).astype(HALF[dtype_name]).astype(np.float32)
    np.testing.assert_array_equal(params["blocks_0"]["mlp"]["fc1"]["kernel"], stored.T)
    # Cast to the requested compute dtype.
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(load_encoder(src, dtype=jnp.bfloat16).params))


def test_half_precision_tolerances():
    assert pos_tolerance(np.float32) == 1e-4
    assert pos_tolerance(np.float16) == pytest.approx(2 * 2.0**-10)
    assert pos_tolerance(ml_dtypes.bfloat16) == pytest.approx(2 * 2.0**-7)


@pytest.mark.parametrize("dtype_name", sorted(HALF))
def test_wrong_position_table_in_half_precision_is_refused_naming_the_dtype(
    tmp_path, bat_dir, bat_state, dtype_name
):
    state = half_state(bat_state, dtype_name)
    # A table 10 % off the sin-cos one (max |diff| 0.1): far beyond any rounding of either dtype.
    state["pos_embed"] = (0.9 * sincos_2d(64, (8, 64))[None]).astype(HALF[dtype_name])
    folder = hf_folder(tmp_path, state, src_config=bat_dir / "config.json")
    tol = f"{pos_tolerance(HALF[dtype_name]):.3g}"
    with pytest.raises(CheckpointError, match=f"tolerance {tol} for a table stored as {dtype_name}"):
        load_encoder(folder)


# ----------------------------------------------------------------------------------------------------
# Non-finite weights


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_is_refused_naming_the_key(tmp_path, bat_dir, bat_state, bad):
    state = dict(bat_state)
    weight = state["blocks.1.mlp.fc1.weight"].copy()  # [256, 64]
    weight[3, 5] = bad
    state["blocks.1.mlp.fc1.weight"] = weight
    folder = hf_folder(tmp_path, state, src_config=bat_dir / "config.json")
    expected = r"non-finite .*'blocks\.1\.mlp\.fc1\.weight' \(1 of 16384 values\)"
    with pytest.raises(CheckpointError, match=expected):
        load_encoder(folder)


def test_non_finite_weight_in_a_pt_names_the_file_key(tmp_path, bat_dir):
    obj = torch.load(bat_dir / "BAT_base_style.pt", weights_only=True)
    obj["state_dict"]["student.encoder.blocks.2.attn.gate.bias"][7] = float("nan")
    path = copy_with_config(bat_dir / "BAT_base_style.pt", tmp_path, bat_dir / "config.json")
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"'student\.encoder\.blocks\.2\.attn\.gate\.bias' \(1 of 64"):
        load_encoder(path)


def test_non_finite_weight_in_own_checkpoint(tmp_path, bat_dir):
    enc = load_encoder(bat_dir)
    enc.params["cls_token"] = enc.params["cls_token"].at[0].set(jnp.nan)
    out = save_encoder(enc, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match=r"'cls_token' \(1 of 64 values\)"):
        load_encoder(out)


# ----------------------------------------------------------------------------------------------------
# `bat-jax convert`: every known input error is one line on stderr and exit status 1


def _bad_inputs(tmp_path, bat_dir, bat_state, own_checkpoint):
    """name → (SRC, text the error names). Built lazily so each case makes only its own files."""
    cfg = bat_dir / "config.json"
    st, pt = bat_dir / "model.safetensors", bat_dir / "BAT_base_style.pt"

    def nan_folder():
        state = dict(bat_state)
        state["cls_token"] = np.full_like(state["cls_token"], np.nan)
        return hf_folder(tmp_path, state, src_config=cfg)

    def wrong_shape():
        state = {**bat_state, "blocks.1.mlp.fc1.weight": np.zeros((128, 64), np.float32)}
        return hf_folder(tmp_path, state, src_config=cfg)

    def damaged_own():
        folder = _copy_own(own_checkpoint, tmp_path)
        data = folder / "params" / "manifest.ocdbt"
        data.write_bytes(random_bytes(data.read_bytes()))
        return folder

    def unknown_format():
        path = tmp_path / "weights.npz"
        path.write_bytes(b"")
        return path

    return {
        "missing": lambda: tmp_path / "nothing.safetensors",
        "unknown_format": unknown_format,
        "wrong_shape": wrong_shape,
        "truncated_safetensors": lambda: damaged_copy(st, tmp_path, "truncated", cfg),
        "random_safetensors": lambda: damaged_copy(st, tmp_path, "random", cfg),
        "truncated_pt": lambda: damaged_copy(pt, tmp_path, "truncated", cfg),
        "random_pt": lambda: damaged_copy(pt, tmp_path, "random", cfg),
        "damaged_own": damaged_own,
        "non_finite": nan_folder,
    }


CLI_CASES = [
    "missing",
    "unknown_format",
    "wrong_shape",
    "truncated_safetensors",
    "random_safetensors",
    "truncated_pt",
    "random_pt",
    "damaged_own",
    "non_finite",
]


def _convert(argv, capsys):
    hook = sys.unraisablehook
    try:
        rc = cli.main(["convert", *map(str, argv)])
    finally:  # the command's report filter lasts its own process, not this test session
        sys.unraisablehook = hook
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_one_line_error(rc, out, err, names):
    assert rc == 1, (out, err)
    assert err.count("\n") == 1 and err.startswith("bat-jax convert: error: "), err
    assert "Traceback" not in err and names in err, err


@pytest.mark.parametrize("case", CLI_CASES)
def test_convert_cli_input_errors_are_one_line(tmp_path, bat_dir, bat_state, own_checkpoint, capsys, case):
    src = _bad_inputs(tmp_path, bat_dir, bat_state, own_checkpoint)[case]()
    rc, out, err = _convert([src, tmp_path / "out"], capsys)
    _assert_one_line_error(rc, out, err, str(src))
    assert not (tmp_path / "out").exists()


def test_convert_cli_without_torch_is_one_line(tmp_path, bat_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    rc, out, err = _convert([bat_dir / "BAT_base_style.pt", tmp_path / "out"], capsys)
    _assert_one_line_error(rc, out, err, "pip install 'bat-jax[torch]'")


def test_convert_cli_existing_output_is_one_line(tmp_path, bat_dir, own_checkpoint, capsys):
    rc, out, err = _convert([bat_dir, own_checkpoint], capsys)
    _assert_one_line_error(rc, out, err, str(own_checkpoint / "params"))
    assert "--overwrite" in err


def test_convert_cli_config_json_error_is_one_line(tmp_path, bat_dir, bat_state, capsys):
    folder = hf_folder(tmp_path, dict(bat_state), src_config=bat_dir / "config.json")
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    rc, out, err = _convert([folder, tmp_path / "out"], capsys)
    _assert_one_line_error(rc, out, err, str(folder / "config.json"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["truncated_safetensors", "damaged_own"])
def test_convert_command_prints_one_line_without_traceback(
    tmp_path, bat_dir, bat_state, own_checkpoint, case
):
    # The installed command as a user runs it: nothing else (Orbax/TensorStore threads, logging) on stderr.
    src = _bad_inputs(tmp_path, bat_dir, bat_state, own_checkpoint)[case]()
    proc = subprocess.run(
        [sys.executable, "-m", "bat_jax.cli", "convert", str(src), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    _assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, str(src))
