"""The workdir's Orbax checkpoints: one CheckpointManager, items ``state`` and ``data``.

    WORKDIR/checkpoints/<step>/state/  {"step", "params": {"encoder", "decoder"}, "teacher", "opt_state",
                                        "rng"}
    WORKDIR/checkpoints/<step>/data/   the Grain iterator state (process_<i>-of-<n>.json)

``step`` is the number of completed updates; the data state is the loader's after the batch of that update
(the loop fetches one batch, steps, and saves before fetching the next). Saves are asynchronous; Orbax
writes ``<step>.orbax-checkpoint-tmp*`` and renames it to ``<step>`` (with ``commit_success.txt``) when
complete, so a kill mid-save leaves the previous checkpoint the latest readable one; the next run's fresh
manager deletes the tmp folder (tests/train/test_resilience.py kills a run mid-save). A failed save raises
`SaveError` from `save` (that step's, or the next one's: Orbax reports a failure in its background thread
only then) or is returned by `wait`.
The reader of a workdir's encoder, without this package's train/ code, is bat_jax/convert/workdir.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from bat_jax.convert import workdir as workdir_lib
from bat_jax.train.step import TrainState

CHECKPOINTS = workdir_lib.CHECKPOINTS  # "checkpoints"
_WHERE = "bat_jax/train/checkpoint.py"


def make_manager(workdir: str | Path, *, keep: int, keep_every: int | None, async_save: bool = True):
    """The workdir's manager: keep the last ``keep`` checkpoints plus every ``keep_every``-th step (None or
    0: none extra). Built fresh per run (stale tmp folders of a killed save are cleaned up)."""
    if keep < 1:
        raise ValueError(f"checkpoint manager ({_WHERE}): expected train.keep >= 1, found {keep}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        keep_period=keep_every or None,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(
        Path(workdir).resolve() / CHECKPOINTS,
        item_names=("state", "data"),
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": grain.checkpoint.CheckpointHandler(),
        },
        options=options,
    )


def state_tree(state: TrainState, rng_data: jax.Array) -> dict[str, Any]:
    """The saved item: plain dict with the documented names (rng as its uint32 key data)."""
    return {
        "step": state.step,
        "params": state.params,
        "teacher": state.teacher_params,
        "opt_state": state.opt_state,
        "rng": rng_data,
    }


def from_tree(tree: dict[str, Any]) -> tuple[TrainState, jax.Array]:
    """The inverse of `state_tree`: (state, the rng's uint32 key data)."""
    state = TrainState(tree["step"], tree["params"], tree["teacher"], tree["opt_state"])
    return state, tree["rng"]


class SaveError(RuntimeError):
    """A checkpoint save failed (this one, or the previous asynchronous one, which Orbax reports only at the
    next save); the message names the step and the latest complete checkpoint."""


def complete_steps(manager) -> list[int]:
    """The steps of the complete checkpoints on disk (Orbax renames ``<step>.orbax-checkpoint-tmp*`` to
    ``<step>`` when a save is committed; a failed save's step may stay in the manager's own cache)."""
    directory = Path(manager.directory)  # WORKDIR/checkpoints
    return workdir_lib.steps(directory.parent) if directory.is_dir() else []


def latest_complete(manager) -> str:
    """'<dir>/<step> (step <step>)' of the latest complete checkpoint, or 'none'."""
    steps = complete_steps(manager)
    return f"{Path(manager.directory) / str(steps[-1])} (step {steps[-1]})" if steps else "none"


def save(manager, step: int, state: TrainState, rng_data: jax.Array, loader) -> None:
    """Start an asynchronous save of ``state``, the rng (its uint32 key data) and the loader's iterator
    state at ``step``. SaveError when it cannot start or the previous asynchronous save failed."""
    try:
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state_tree(state, rng_data)),
                data=grain.checkpoint.CheckpointSave(loader),
            ),
            force=True,
        )
    except Exception as e:  # noqa: BLE001 - re-raised with the step and the checkpoint to resume from
        raise SaveError(
            f"checkpoint save ({_WHERE}): expected the saves up to step {step} in {manager.directory} to "
            f"succeed, found {type(e).__name__}: {e}; the latest complete checkpoint is "
            f"{latest_complete(manager)}"
        ) from e


def abstract_tree(abstract_state: TrainState, rng_sharding) -> dict[str, Any]:
    """`state_tree` of ShapeDtypeStructs (with shardings) from an abstract TrainState."""
    rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32, sharding=rng_sharding)
    return {
        "step": abstract_state.step,
        "params": abstract_state.params,
        "teacher": abstract_state.teacher_params,
        "opt_state": abstract_state.opt_state,
        "rng": rng,
    }


def restore(manager, step: int, abstract: dict[str, Any], loader):
    """(state, rng) of ``step``, placed as the shardings in ``abstract`` (an `abstract_tree`, any mesh);
    the loader continues from the saved iterator state."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            data=grain.checkpoint.CheckpointRestore(loader),
        ),
    )
    return from_tree(restored["state"])


def wait(manager) -> str | None:
    """Wait for the pending save; the error message of a failed one (Orbax raises it only here), else None."""
    try:
        manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 - reported to the user, never swallowed
        return f"{type(e).__name__}: {e}; the latest complete checkpoint is {latest_complete(manager)}"
    return None
