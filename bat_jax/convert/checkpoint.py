"""The project's own encoder checkpoint: an Orbax params checkpoint plus a config.json.

Layout of a checkpoint folder OUT (written by `save_encoder` / `bat-jax convert`)::

    OUT/config.json   {"format": "bat-jax-encoder", "format_version": 1,
                       "config": {EncoderConfig fields}, "source": SRC}
    OUT/params/       Orbax (StandardCheckpointer) checkpoint of the parameter pytree

Reading one back is as strict as importing a PyTorch file: an unreadable config.json or params/, a
parameter tree that disagrees with the config, or a NaN/Inf value is a `CheckpointError` naming the path.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from bat_jax.convert.errors import CheckpointError, one_line
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
        with undeliverable_reads_dropped(), ocp.StandardCheckpointer() as checkpointer:  # closed on failure
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


def _is_undeliverable_read(unraisable: Any) -> bool:
    """RuntimeError('Event loop is closed') raised by asyncio's call_soon_threadsafe."""
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    return any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(exc.__traceback__))


def _dropping_hook(previous: Callable[[Any], Any], on_drop: Callable[[], None]) -> Callable[[Any], Any]:
    """An unraisable hook that drops undeliverable TensorStore reads (calling `on_drop`) and hands every
    other report on to `previous`."""

    def hook(unraisable: Any) -> None:
        if _is_undeliverable_read(unraisable):
            on_drop()
        else:
            previous(unraisable)

    hook.drops_undeliverable_reads = True  # type: ignore[attr-defined]
    return hook


@contextlib.contextmanager
def undeliverable_reads_dropped(quiet_s: float = 0.05, max_wait_s: float = 1.0) -> Iterator[None]:
    """While inside: after a failed Orbax restore, TensorStore reads still in flight hand their result to
    Orbax's event loop, already closed, and each prints a RuntimeError('Event loop is closed') traceback
    through sys.unraisablehook. Those results have no reader: drop exactly these reports (every other one
    reaches the previous hook). When the body fails, wait (on that path only) until no such report came
    for `quiet_s` (measured: they all arrive within ~5 ms), at most `max_wait_s`; then put the previous
    hook back. `drop_undeliverable_reads_until_exit` is the backstop for the `bat-jax convert` process."""
    previous = sys.unraisablehook
    last_drop = [time.monotonic()]
    hook = _dropping_hook(previous, lambda: last_drop.__setitem__(0, time.monotonic()))
    sys.unraisablehook = hook
    try:
        yield
    except BaseException:
        start = last_drop[0] = time.monotonic()
        while time.monotonic() - last_drop[0] < quiet_s and time.monotonic() - start < max_wait_s:
            time.sleep(quiet_s / 10)
        raise
    finally:
        if sys.unraisablehook is hook:  # somebody else may have installed theirs meanwhile: keep it
            sys.unraisablehook = previous


def drop_undeliverable_reads_until_exit() -> None:
    """Install the filter of `undeliverable_reads_dropped` for the rest of the process (once). Only for a
    command's own process (`bat-jax convert`): its one-line error must not be followed by TensorStore
    tracebacks printed at exit; a library call (load_encoder) uses the scoped context manager."""
    if not getattr(sys.unraisablehook, "drops_undeliverable_reads", False):
        sys.unraisablehook = _dropping_hook(sys.unraisablehook, lambda: None)
