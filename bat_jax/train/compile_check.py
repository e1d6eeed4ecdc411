"""`bat-jax compile-check`: the sharded pretraining step compiled ahead of time for an accelerator topology
this machine does not have, with its memory per chip, before a pod is booked.

    report = compile_check(cfg, "v5p:4x4x4")      # cfg: a pretraining config (bat_jax.train.config.load)
    print(format_report(report))                  # mesh, batch per chip, memory vs HBM, FLOPs, compile time

How: `jax.experimental.topologies.get_topology_desc` describes the TPU slice's chips (libtpu's compile-only
client: `pip install 'bat-jax[tpu]'`; no TPU needed), or NVIDIA GPUs ("h100:4x8": XLA:GPU's compile-only
client from the CUDA plugin, `pip install 'bat-jax[gpu-compile]'`, the card described by
`bat_jax.train.gpu_targets`; no GPU or driver needed); the config's (data, fsdp) mesh is laid over them
(`bat_jax.train.mesh.make_mesh`), the state's shardings come from the models' logical axes
(`bat_jax.train.sharded.abstract_state`: nothing is allocated), and the real job's step
(`bat_jax.train.sharded.jit_step`) is lowered for a global batch of `data.global_batch_size` clips and
compiled by XLA:TPU (or XLA:GPU). The memory figures are XLA's (`compiled.memory_analysis()`): the
arguments (state and batch), the outputs, the temporaries and the aliased bytes (the donated state,
counted once); the total is set against the chip's HBM (`HBM_GIB`, or the GPU's memory). FLOPs: XLA's count
for one chip (`cost_analysis`; none on GPU) and the model FLOPs of the global batch
(`bat_jax.train.flops.step_flops`).

A config that does not fit gets a `DoesNotFit` sentence naming the chip, the need and the excess, and the
settings that would lower it: FSDP over more chips, rematerialisation, micro-batches, a smaller batch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bat_jax.train import config as config_lib
from bat_jax.train import flops as flops_lib
from bat_jax.train import gpu_targets, sharded
from bat_jax.train import mesh as mesh_lib

GIB = 2**30
MEM_FRACTION_NOTE = "JAX's XLA_PYTHON_CLIENT_MEM_FRACTION"
# HBM per chip (GiB) by the device kind XLA reports; the TPU documentation's figures.
HBM_GIB = {
    "TPU v2": 16.0,
    "TPU v3": 32.0,
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,
    "TPU v5e": 16.0,
    "TPU v5": 95.0,
    "TPU v5p": 95.0,
    "TPU v6 lite": 32.0,
    "TPU v6e": 32.0,
}


class CompileCheckError(ValueError):
    """A topology or config compile-check cannot use: one sentence."""


class DoesNotFit(CompileCheckError):
    """The compiled step needs more memory per chip than the chip has."""


@dataclasses.dataclass(frozen=True)
class Report:
    topology: str
    device_kind: str
    chips: int
    mesh: dict[str, int]
    global_batch: int
    clips_per_chip: int
    micro_batches: int
    views: int
    remat: str
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    hbm_bytes: int | None
    xla_flops_per_chip: float | None
    model_flops: float
    compile_s: float
    # what the step may use of the HBM: all of it on TPU; on GPU the share JAX's allocator takes
    # (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set); None: the HBM
    usable_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        """Peak bytes per chip: arguments + outputs + temporaries + code − aliased (the donated state)."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes + self.code_bytes - self.alias_bytes

    @property
    def limit_bytes(self) -> int | None:
        return self.hbm_bytes if self.usable_bytes is None else self.usable_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.limit_bytes is None else self.total_bytes <= self.limit_bytes

    def row(self) -> dict[str, Any]:
        """The report as one JSON-able row (benchmarks, --json)."""
        out = dataclasses.asdict(self)
        out.update(total_bytes=self.total_bytes, limit_bytes=self.limit_bytes, fits=self.fits)
        return out


def topology_devices(topology: str) -> list[Any]:
    """The chips of a TPU topology such as "v5p:2x2x1" (libtpu's compile-only client; no TPU needed) or the
    GPUs of "h100:4x8" (XLA:GPU's compile-only client; no GPU needed)."""
    if gpu_targets.is_gpu_topology(topology):
        return gpu_devices(topology)
    if ":" not in topology:
        raise CompileCheckError(
            f"--topology: expected a TPU topology like v5p:2x2x1 or v5e:4x4 (generation:chips per axis) or "
            f"GPUs like h100:8 or h100:4x8 (nodes x GPUs per node), found {topology!r}"
        )
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise CompileCheckError(
            "--topology: compiling for a TPU topology needs libtpu (its compile-only client runs on any "
            "machine): pip install 'bat-jax[tpu]'"
        ) from None
    from jax.experimental import topologies

    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # noqa: BLE001 - libtpu raises XlaRuntimeError / RuntimeError with its reason
        raise CompileCheckError(f"--topology {topology}: libtpu does not know this topology ({e})") from None
    return list(desc.devices)


def gpu_devices(topology: str) -> list[Any]:
    """The GPUs of "h100:4x8" (4 nodes of 8 H100) as XLA:GPU's compile-only client describes them."""
    try:
        card, nodes, per_node = gpu_targets.parse(topology)
    except ValueError as e:
        raise CompileCheckError(str(e)) from None
    if not gpu_targets.cuda_plugin_installed():
        raise CompileCheckError(
            f"--topology {topology}: compiling for NVIDIA GPUs needs JAX's CUDA plugin (its compile-only "
            "client runs on any machine, no GPU or driver needed): pip install 'bat-jax[gpu-compile]'"
        )
    from jax.experimental import topologies

    try:  # slices x hosts per slice x devices per host
        desc = topologies.get_topology_desc(
            platform="cuda", target_config=card.target_config(), topology=f"1x{nodes}x{per_node}"
        )
    except NotImplementedError:  # the plugin was found but did not register: CUDA's libraries were checked
        raise CompileCheckError(
            f"--topology {topology}: JAX's CUDA plugin did not register (without a GPU it needs CUDA left "
            "out of the platforms): run with JAX_PLATFORMS=cpu set before JAX starts"
        ) from None
    except Exception as e:  # noqa: BLE001 - the plugin raises XlaRuntimeError / RuntimeError with its reason
        raise CompileCheckError(f"--topology {topology}: the CUDA plugin refused it ({e})") from None
    return list(desc.devices)


def compiler_options(devices: list[Any]) -> dict[str, Any]:
    """XLA options for compiling on these devices: for GPUs without a GPU attached, cuBLAS rather than
    Triton for the matmuls (XLA:GPU picks Triton GEMM tiles by autotuning on the card; compiling only, it
    stops at "Couldn't find output tile sizes"). The memory figures change little: both keep the operands
    and outputs, cuBLAS adds its workspace."""
    return {"xla_gpu_enable_triton_gemm": False} if devices[0].platform in ("gpu", "cuda") else {}


def gpu_memory_fraction() -> float:
    """The share of a GPU's memory JAX's allocator takes: XLA_PYTHON_CLIENT_MEM_FRACTION, by default 0.75."""
    text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
    try:
        fraction = float(text)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction <= 1:
        raise CompileCheckError(
            f"XLA_PYTHON_CLIENT_MEM_FRACTION: expected a number in (0, 1], found {text!r}"
        )
    return fraction


def usable_bytes(device_kind: str) -> int | None:
    """HBM the step may use: a GPU's memory times gpu_memory_fraction(); a TPU chip's HBM."""
    hbm = hbm_bytes(device_kind)
    if hbm is None or device_kind not in gpu_targets.MEMORY_BYTES:
        return hbm
    return int(hbm * gpu_memory_fraction())


def hbm_bytes(device_kind: str) -> int | None:
    if device_kind in gpu_targets.MEMORY_BYTES:
        return gpu_targets.MEMORY_BYTES[device_kind]
    gib = HBM_GIB.get(device_kind)
    return None if gib is None else int(gib * GIB)


def compile_check(cfg: ml_collections.ConfigDict, topology: str, devices: list[Any] | None = None) -> Report:
    """Compile the config's pretraining step for `topology` (or the given `devices`); a Report, or
    CompileCheckError when the config cannot be laid over these chips (the mesh, the batch)."""
    devices = topology_devices(topology) if devices is None else devices
    if "mesh" not in cfg:
        raise CompileCheckError("config: expected a mesh section (configs/pretrain/*.py have one)")
    ssl, tx = config_lib.ssl_config(cfg), config_lib.optimizer(cfg)
    try:
        mesh = mesh_lib.make_mesh(cfg, devices)
        rules = mesh_lib.logical_rules(cfg)
    except ValueError as e:
        raise CompileCheckError(f"{topology} ({len(devices)} chips): {e}") from None
    micro = mesh_lib.micro_batches(cfg)
    batch = int(cfg.data.global_batch_size)
    state, shardings = sharded.abstract_state(ssl, tx, mesh, rules)
    batch_sharding = mesh_lib.batch_sharding(mesh)
    step = sharded.jit_step(ssl, tx, mesh, rules, shardings, batch_sharding, micro_batches=micro)
    spec = jax.ShapeDtypeStruct(
        (batch, int(cfg.frames), ssl.encoder.n_mels), jnp.float32, sharding=batch_sharding
    )
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))
    start = time.perf_counter()
    compiled = step.lower(state, spec, key).compile(compiler_options=compiler_options(devices))
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    kind = devices[0].device_kind
    return Report(
        topology=topology,
        device_kind=kind,
        chips=len(devices),
        mesh=dict(mesh.shape),
        global_batch=batch,
        clips_per_chip=batch // mesh_lib.batch_shards(mesh),
        micro_batches=micro,
        views=int(ssl.num_views),
        remat=ssl.encoder.remat_policy,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        hbm_bytes=hbm_bytes(kind),
        usable_bytes=usable_bytes(kind),
        xla_flops_per_chip=float(cost["flops"]) if cost and "flops" in cost else None,
        model_flops=float(flops_lib.step_flops(ssl, batch)),
        compile_s=round(seconds, 1),
    )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def format_report(r: Report) -> str:
    """The lines `bat-jax compile-check` prints for one topology."""
    hbm = "unknown HBM" if r.hbm_bytes is None else f"{_gib(r.hbm_bytes)} HBM"
    if r.usable_bytes is not None and r.usable_bytes != r.hbm_bytes:
        share = r.usable_bytes / r.hbm_bytes
        hbm = f"{_gib(r.usable_bytes)} usable ({share:.2f} of {hbm}: {MEM_FRACTION_NOTE})"
    verdict = {True: "fits", False: "DOES NOT FIT", None: "HBM unknown"}[r.fits]
    flops = "n/a" if r.xla_flops_per_chip is None else f"{r.xla_flops_per_chip:.3g}"
    return "\n".join(
        [
            f"{r.topology}: {r.chips} x {r.device_kind}, mesh {r.mesh}, {r.global_batch} clips x {r.views} "
            f"views per step = {r.clips_per_chip} clips per chip in {r.micro_batches} micro-batch(es), "
            f"remat {r.remat}; compiled in {r.compile_s} s",
            f"  memory per chip: arguments {_gib(r.argument_bytes)}, outputs {_gib(r.output_bytes)}, "
            f"temporaries {_gib(r.temp_bytes)}, aliased {_gib(r.alias_bytes)}, code {_gib(r.code_bytes)}; "
            f"total {_gib(r.total_bytes)} of {hbm}: {verdict}",
            f"  FLOPs per step: {flops} per chip (XLA), {r.model_flops:.3g} model FLOPs for the global batch",
        ]
    )


def advice(r: Report) -> str:
    """Settings that lower the memory per chip of a config that does not fit, most effective first."""
    tips = []
    if r.mesh.get("fsdp", 1) < r.chips:
        more = min(r.chips, max(2, 2 * r.mesh.get("fsdp", 1)))
        tips.append(
            f"--config.mesh.shape.fsdp={more} (parameters and optimizer state split over {more} chips)"
        )
    if r.remat == "none":
        tips.append("--config.encoder.overrides.remat_policy=full (recompute the blocks' activations)")
    if r.clips_per_chip > 1:
        tips.append(
            f"--config.train.micro_batches={2 * r.micro_batches} (the batch in parts, gradients summed)"
        )
    tips.append(f"a smaller --config.data.global_batch_size (now {r.global_batch})")
    if r.limit_bytes is not None and r.hbm_bytes is not None and r.limit_bytes < r.total_bytes <= r.hbm_bytes:
        tips.append("XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 in the job's environment (a launcher's --env)")
    return "; or ".join(tips)


def check_fits(r: Report) -> None:
    """DoesNotFit (one sentence: the chip, the need, the excess, what to try) when the step exceeds HBM."""
    if r.fits is False:
        over = r.total_bytes - (r.limit_bytes or 0)
        has = f"{_gib(r.hbm_bytes or 0)} HBM"
        if r.limit_bytes != r.hbm_bytes:
            has = f"{_gib(r.limit_bytes or 0)} usable of {has} ({MEM_FRACTION_NOTE})"
        raise DoesNotFit(
            f"{r.topology}: the step needs {_gib(r.total_bytes)} per {r.device_kind} chip, which has "
            f"{has} ({_gib(over)} over); try {advice(r)}"
        )


def largest_batch(
    cfg: ml_collections.ConfigDict, topology: str, devices: list[Any], start: int
) -> tuple[int, Report | None]:
    """The largest global batch (doubling from `start`, a multiple of the batch devices) whose step fits."""
    best: tuple[int, Report | None] = (0, None)
    batch = start
    while True:
        c = ml_collections.ConfigDict(cfg.to_dict())
        c.data.global_batch_size = batch
        r = compile_check(c, topology, devices)
        if not r.fits:
            return best
        best = (batch, r)
        batch *= 2
        if batch > 1 << 20:
            return best
