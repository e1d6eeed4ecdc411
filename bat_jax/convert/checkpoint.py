"""The project's own encoder checkpoint: an Orbax params checkpoint plus a config.json.

Layout of a checkpoint folder OUT (written by `save_encoder` / `bat-jax convert`)::

    OUT/config.json   {"format": "bat-jax-encoder", "format_version": 1,
                       "config": {EncoderConfig fields}, "source": SRC}
    OUT/params/       Orbax (StandardCheckpointer) checkpoint of the parameter pytree

Reading one back is as strict as importing a PyTorch file: an unreadable config.json or params/, a
parameter tree that disagrees with the config, or a NaN/Inf value is a `CheckpointError` naming the path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bat_jax.convert.errors import CheckpointError, one_line
from bat_jax.convert.leftover_reads import reads_dropped
from bat_jax.convert.mapping import check_finite
from bat_jax.models.config import EncoderConfig
from bat_jax.models.encoder import FrozenEncoder, abstract_params, unbox

FORMAT = "bat-jax-encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


def read_own_config(folder: Path) -> dict[str, Any] | None:
    """The parsed config.json of a bat-jax checkpoint folder, or None when `folder` is not one; a
    CheckpointError when it has a params/ folder but its config.json cannot be read."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if (folder / PARAMS_DIR).is_dir():
            raise CheckpointError(
                f"{path}: cannot read the config.json of this bat-jax checkpoint ({one_line(e)}); expected "
                "the JSON written by `bat-jax convert` / save_encoder"
            ) from e
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def save_encoder(
    encoder: FrozenEncoder, out: str | Path, *, source: str | None = None, overwrite: bool = False
) -> Path:
    """Write `encoder` to the folder `out` (see module docstring); returns the folder."""
    out = Path(out).absolute()
    params_dir = out / PARAMS_DIR
    if params_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{params_dir} already exists: choose another folder, or overwrite it "
            "(bat-jax convert --overwrite, save_encoder(..., overwrite=True))"
        )
    out.mkdir(parents=True, exist_ok=True)
    import orbax.checkpoint as ocp  # imported lazily: keeps `import bat_jax` fast

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, jax.tree.map(np.asarray, encoder.params), force=overwrite)
    checkpointer.wait_until_finished()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": encoder.config.to_dict(),
        "source": source,
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _flat(tree: Any) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {key: tuple(leaf.shape) for key, leaf in _flat(tree).items()}


def check_tree(found: Any, expected: Any, where: str) -> None:
    """Raise CheckpointError naming missing/unexpected parameter paths and shape mismatches."""
    got, want = _flat_shapes(found), _flat_shapes(expected)
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: the parameters do not match the config: missing {missing[:12]}, "
            f"unexpected {unexpected[:12]}"
        )
    for key, shape in want.items():
        if got[key] != shape:
            raise CheckpointError(
                f"{where}: parameter {key!r} has shape {list(got[key])}, expected {list(shape)}"
            )


def load_own(folder: Path, meta: dict[str, Any]) -> tuple[EncoderConfig, Any]:
    """(config, params as numpy) from a bat-jax checkpoint folder, checked against the config."""
    where = str(folder)
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}/{CONFIG_FILE}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}"
        )
    try:
        config = EncoderConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{where}/{CONFIG_FILE}: 'config' is not a valid EncoderConfig ({one_line(e)})"
        ) from e
    params_dir = (folder / PARAMS_DIR).absolute()
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{where}: expected the Orbax params checkpoint in {params_dir}")
    import orbax.checkpoint as ocp

    try:
        with reads_dropped(str(params_dir)), ocp.StandardCheckpointer() as checkpointer:  # closed on failure
            params = checkpointer.restore(params_dir)
    except Exception as e:  # Orbax / TensorStore raise many types for a damaged folder
        raise CheckpointError(
            f"{params_dir}: cannot restore the Orbax params checkpoint ({type(e).__name__}: {one_line(e)}); "
            "the folder is incomplete or damaged: convert the source checkpoint again"
        ) from e
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)  # as every import: float32
    check_tree(params, unbox(abstract_params(config)), str(params_dir))
    check_finite(_flat(params), str(params_dir))
    return config, params
