"""Several JAX processes (hosts) in one pretraining run: `jax.distributed.initialize`, host reads of
replicated values, and the SIGTERM stop agreed by every process.

    from bat_jax.train import distributed
    distributed.initialize(distributed.Options(...))   # before any other JAX call of the run
    distributed.is_primary()                           # process 0 writes the workdir's files and the console
    distributed.host_values(metrics)                   # replicated device values as numpy, on every process
    stop = distributed.StopAgreement(mesh)             # stop.poll(local_flag) at every step boundary

Initialisation (`initialize`): with ``--coordinator-address HOST:PORT --num-processes N
--process-id I`` (all three together) JAX's runtime starts with them; without flags the environment decides:
a SLURM step of several tasks (``srun``), an Open MPI run of several ranks, a Cloud TPU VM (libtpu and a TPU
device) or GKE TPU workers, or ``JAX_COORDINATOR_ADDRESS`` set → ``jax.distributed.initialize()`` with no
arguments (JAX detects the rest, PITFALLS.md "Multi-host"); anything else is one process and nothing is
called. ``--single-process`` skips the detection.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class DistributedError(ValueError):
    """Flags or an environment that cannot start (or join) a multi-process run; the message names them."""


@dataclasses.dataclass(frozen=True)
class Options:
    """The command line's multi-process flags (None: not given)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    single_process: bool = False

    @property
    def explicit(self) -> bool:
        return any(v is not None for v in (self.coordinator_address, self.num_processes, self.process_id))


def parse_device_ids(text: str) -> tuple[int, ...]:
    """``--local-device-ids 0,1`` → (0, 1); DistributedError naming the flag otherwise."""
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", text or ""):
        raise DistributedError(
            f"--local-device-ids: expected comma-separated device numbers such as 0,1, found {text!r}"
        )
    return tuple(int(part) for part in text.split(","))


def check_options(options: Options) -> None:
    """The flags' combinations: coordinator, process count and process id together, 0 <= id < count, an
    address HOST:PORT; --single-process with none of them. DistributedError (one line) otherwise."""
    given = {
        "--coordinator-address": options.coordinator_address,
        "--num-processes": options.num_processes,
        "--process-id": options.process_id,
    }
    if options.single_process and (options.explicit or options.local_device_ids is not None):
        named = [k for k, v in given.items() if v is not None] or ["--local-device-ids"]
        raise DistributedError(f"--single-process: expected no multi-process flags with it, found {named[0]}")
    if options.explicit:
        missing = [k for k, v in given.items() if v is None]
        if missing:
            present = [k for k, v in given.items() if v is not None]
            raise DistributedError(
                f"{present[0]}: expected --coordinator-address HOST:PORT, --num-processes N and --process-id "
                f"I together, found no {' and no '.join(missing)}"
            )
        if not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:]+\]:\d+", options.coordinator_address):
            raise DistributedError(
                f"--coordinator-address: expected HOST:PORT (process 0's address), found "
                f"{options.coordinator_address!r}"
            )
        if options.num_processes < 1:
            raise DistributedError(
                f"--num-processes: expected an integer >= 1, found {options.num_processes}"
            )
        if not 0 <= options.process_id < options.num_processes:
            raise DistributedError(
                f"--process-id: expected 0 <= I < --num-processes = {options.num_processes}, found "
                f"{options.process_id}"
            )
    elif options.local_device_ids is not None and detect_cluster() is None:
        raise DistributedError(
            "--local-device-ids: expected a multi-process run (--coordinator-address, --num-processes and "
            "--process-id, or a SLURM / MPI / TPU environment), found neither"
        )


def _more_than_one(value: str | None) -> bool:
    try:
        return int(value or "1") > 1
    except ValueError:
        return False


def _on_tpu_vm() -> bool:
    """libtpu installed and a TPU device present (what jax's Cloud TPU detection starts from)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    return Path("/dev/accel0").exists() or any(Path("/dev/vfio").glob("[0-9]*"))


def detect_cluster(environ: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> str | None:
    """The multi-process environment this process runs in, or None (a plain single process):
    "JAX_COORDINATOR_ADDRESS", "slurm" (an srun step of several tasks), "mpi" (several Open MPI ranks),
    "tpu" (GKE TPU workers, or a Cloud TPU VM)."""
    env = os.environ if environ is None else environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm) and _more_than_one(
        env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    ):
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _more_than_one(env.get("OMPI_COMM_WORLD_SIZE")):
        return "mpi"
    workers = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if "," in workers:
        return "tpu"
    if (_on_tpu_vm() if tpu_vm is None else tpu_vm) and "TPU_SKIP_MDS_QUERY" not in env:
        return "tpu"
    return None


def initialize(options: Options) -> str | None:
    """Start JAX's distributed runtime as the flags or the environment say (see the module docstring), before
    any other JAX call; what started it ("flags", a `detect_cluster` name) or None for a single process.
    DistributedError (one line) for bad flags or a runtime that does not start."""
    check_options(options)
    if options.single_process or jax.distributed.is_initialized():
        return None
    ids = list(options.local_device_ids) if options.local_device_ids is not None else None
    how = "flags" if options.explicit else detect_cluster()
    if how is None:
        return None
    try:
        if options.explicit:
            jax.distributed.initialize(
                options.coordinator_address, options.num_processes, options.process_id, local_device_ids=ids
            )
        else:
            jax.distributed.initialize(local_device_ids=ids)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if options.explicit else " (pass --single-process to run as one process)"
        raise DistributedError(f"jax.distributed.initialize ({how}) failed: {first}{hint}") from None
    return how


def is_primary() -> bool:
    """Process 0: the one that writes config.json, metrics.jsonl, tb/ and the console."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here for the others (nothing with one process). Used once after the compile:
    compile times differ between hosts, and a first step whose collectives wait too long fails (gloo's
    reduce-scatter gives up after 30 s, PITFALLS.md "Multi-host")."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def host_values(tree: Any) -> Any:
    """Replicated device values as numpy on every process: this process's first copy of each array
    (`jax.device_get` refuses arrays that are not fully addressable, as on several processes). An explicit
    transfer, allowed under `jax.transfer_guard("disallow")`."""
    return jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), tree))


class StopAgreement:
    """A stop (SIGTERM) that every process takes after the same step.

    ``poll(local)`` is called by every process at every step boundary, in the same order. With one process
    it returns ``local`` (no collective, no cost). With several, each boundary starts an all-reduce (max) of
    the processes' local flags on the devices and returns the result of the *previous* boundary's
    all-reduce: by then it has long finished, so the host never waits for the step it just dispatched, only
    (at most) for the one before, and every process reads the same value at the same boundary, so all stop
    after the same step and save it together. The price is one step of delay after the signal. (A
    synchronous host all-gather, multihost_utils.process_allgather, would block on the running step at
    every boundary.)"""

    def __init__(self, mesh: Mesh, process_count: int | None = None):
        self.process_count = jax.process_count() if process_count is None else process_count
        self._pending = None
        if self.process_count > 1:
            self._flags = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))
            self._local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
            self._shape = (mesh.devices.size,)
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def poll(self, local: bool) -> bool:
        if self.process_count == 1:
            return bool(local)
        flags = np.full((self._local,), int(bool(local)), np.int32)  # [this process's devices of the mesh]
        with jax.transfer_guard_host_to_device("allow"):  # explicit, though jax counts it implicit here
            flags = jax.make_array_from_process_local_data(self._flags, flags, self._shape)
        started = self._any(flags)
        previous, self._pending = self._pending, started
        return previous is not None and bool(host_values(previous))
