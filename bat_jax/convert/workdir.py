"""Read the encoder of a `bat-jax pretrain` workdir (config.json + checkpoints/<step>/state/), by path.

Kept in convert/ so that the flow stays one way (train/ writes workdirs, convert/ reads them without importing
train/). The saved state item (bat_jax/train/checkpoint.py) is {"step", "params": {"encoder", "decoder"},
"teacher", "opt_state", "rng"}; only the asked part is read: an encoder (the student's, or the EMA teacher)
with `load_workdir`, the student's decoder with `load_workdir_decoder` (train.init_from).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from bat_jax.convert.errors import CheckpointError
from bat_jax.models.config import PRESETS, EncoderConfig

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"


def is_workdir(path: Path) -> bool:
    return path.is_dir() and (path / CHECKPOINTS).is_dir() and (path / CONFIG_FILE).is_file()


def steps(path: Path) -> list[int]:
    """The finished checkpoints' steps (Orbax renames a save's tmp folder to <step> when it is complete)."""
    return sorted(int(p.name) for p in (path / CHECKPOINTS).iterdir() if p.is_dir() and p.name.isdigit())


def encoder_config(path: Path) -> EncoderConfig:
    """The encoder of the workdir's resolved config: encoder.preset with encoder.overrides."""
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
        preset, overrides = cfg["encoder"]["preset"], dict(cfg["encoder"].get("overrides") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: expected a pretraining config with encoder.preset, found {e!r}"
        ) from e
    if preset not in PRESETS:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: encoder.preset {preset!r}, expected one of {sorted(PRESETS)}"
        )
    for key in ("patch_size", "pos_grid"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return PRESETS[preset](**overrides)


def resolve_step(path: Path, step: int | None = None) -> int:
    """``step`` when the workdir has a finished checkpoint of it; by default the latest one."""
    found = steps(path)
    if not found:
        raise CheckpointError(f"{path / CHECKPOINTS}: expected at least one finished checkpoint, found none")
    if step is None:
        return found[-1]
    if step not in found:
        raise CheckpointError(
            f"{path / CHECKPOINTS}: expected a checkpoint of step {step}, found steps {found}"
        )
    return step


def load_workdir(path: Path, *, step: int | None = None, teacher: bool = False) -> tuple[EncoderConfig, Any]:
    """(config, float32-or-stored-dtype numpy params) of the student encoder (or the EMA teacher) at
    ``step`` (default: the latest checkpoint)."""
    keys = ("teacher",) if teacher else ("params", "encoder")
    return encoder_config(path), _restore(path, resolve_step(path, step), keys)


def load_workdir_decoder(path: Path, *, step: int | None = None) -> tuple[int, Any]:
    """(step, stored-dtype numpy params) of the student's decoder at ``step`` (default: the latest
    checkpoint), for continued pretraining. CheckpointError when the state has no decoder."""
    step = resolve_step(path, step)
    return step, _restore(path, step, ("params", "decoder"))


def _restore(path: Path, step: int, keys: tuple[str, ...]) -> Any:
    """The subtree at ``keys`` of a checkpoint's state item, restored alone into numpy arrays (Orbax
    metadata, then a partial restore: the rest of the state is not read)."""
    import orbax.checkpoint as ocp

    state_dir = (path / CHECKPOINTS / str(step) / "state").absolute()
    checkpointer = ocp.PyTreeCheckpointer()
    quiet = _NoItemMetadataWarning()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        node = checkpointer.metadata(state_dir).item_metadata.tree
        for key in keys:
            node = node[key]
        sub = node
        for key in reversed(keys):
            sub = {key: sub}
        restore_args = _numpy_restore_args(sub, ocp)
        restored = checkpointer.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=sub, restore_args=restore_args, partial_restore=True)
        )
    except Exception as e:  # a missing key (KeyError); Orbax / TensorStore raise many types when damaged
        why = f"{type(e).__name__}: {e}"
        raise CheckpointError(
            f"{state_dir}: not a readable pretraining state with {'.'.join(keys)} ({why})"
        ) from e
    finally:
        checkpointer.close()
        absl_logger.removeFilter(quiet)
    for key in keys:
        restored = restored[key]
    return restored


class _NoItemMetadataWarning(logging.Filter):
    """Drops Orbax's "Metadata file does not exist" for the state item read alone: a CheckpointManager writes
    that file for the whole step, one folder up, so an item restored by itself never has one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


def _numpy_restore_args(tree: Any, ocp) -> Any:
    import jax

    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
