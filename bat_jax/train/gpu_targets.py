"""NVIDIA GPUs that `bat-jax compile-check` can compile for without one: XLA:GPU's compile-only client
(`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=..., topology=...)`, the CUDA
plugin `pip install 'bat-jax[gpu-compile]'`, no driver, no GPU) needs the card described as a
`GpuTargetConfigProto` in text form; `target_config(card)` writes it from the card's data sheet below.

    --topology h100:8      one node of 8 H100 (SXM, 80 GB)
    --topology h100:4x8    4 nodes of 8: 32 GPUs, one process per GPU as `bat-jax launch slurm` runs them

The figures are the cards' published ones (the SM count, shared memory, L2, memory bandwidth, boost clock,
the memory the driver reports): XLA uses them to choose its kernels' tiling and launch shapes, and the
device memory is the HBM the report compares the step's memory against.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re


@dataclasses.dataclass(frozen=True)
class GpuCard:
    name: str  # the device kind XLA reports, as on a real card
    compute_capability: int  # major version: 8 Ampere, 9 Hopper
    sm_count: int
    fpus_per_sm: int
    shared_memory_per_sm: int  # bytes
    shared_memory_per_block_optin: int  # bytes
    l2_bytes: int
    memory_bytes: int  # device memory the driver reports
    memory_bandwidth: int  # bytes / s
    clock_ghz: float
    cudnn: tuple[int, int]

    def target_config(self) -> str:
        """The card as a text GpuTargetConfigProto (stream_executor/device_description.proto)."""
        hopper = self.compute_capability >= 9
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fpus_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {self.compute_capability}
    feature_extension: {"ACCELERATED_FEATURES" if hopper else "NONE"}
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}}
platform_name: "CUDA"
dnn_version_info {{
  major: {self.cudnn[0]}
  minor: {self.cudnn[1]}
}}
device_description_str: "{self.name}"
"""


# Hopper: 132 SMs, 228 KiB shared memory per SM (227 KiB per block opt-in), 50 MiB L2, 1.98 GHz boost.
_HOPPER = dict(
    compute_capability=9,
    sm_count=132,
    fpus_per_sm=128,
    shared_memory_per_sm=233472,
    shared_memory_per_block_optin=232448,
    l2_bytes=52428800,
    clock_ghz=1.98,
    cudnn=(9, 8),  # a cuDNN 9 runtime, as jax[cuda12] installs
)
CARDS = {
    "h100": GpuCard(
        "NVIDIA H100 80GB HBM3", memory_bytes=84942979072, memory_bandwidth=3352320000000, **_HOPPER
    ),
    "h200": GpuCard(
        "NVIDIA H200 141GB HBM3e", memory_bytes=151397597184, memory_bandwidth=4800000000000, **_HOPPER
    ),
    "a100": GpuCard(
        "NVIDIA A100-SXM4-80GB",
        compute_capability=8,
        sm_count=108,
        fpus_per_sm=64,
        shared_memory_per_sm=167936,
        shared_memory_per_block_optin=166912,
        l2_bytes=41943040,
        memory_bytes=85100068864,
        memory_bandwidth=2039040000000,
        clock_ghz=1.41,
        cudnn=(9, 8),
    ),
}
MEMORY_BYTES = {card.name: card.memory_bytes for card in CARDS.values()}  # by device kind


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (jax-cuda12-plugin or -cuda13) is installed; nothing is imported."""
    if importlib.util.find_spec("jax_plugins") is None:  # the namespace package: absent without any plugin
        return False
    return any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13))


def is_gpu_topology(topology: str) -> bool:
    return topology.split(":", 1)[0].lower() in CARDS


def parse(topology: str) -> tuple[GpuCard, int, int]:
    """ "h100:8" → (the H100, 1 node, 8 GPUs per node); "h100:4x8" → (the H100, 4 nodes, 8 per node)."""
    card, _, shape = topology.partition(":")
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", shape)
    if card.lower() not in CARDS or m is None or int(m.group(2)) < 1 or (m.group(1) and int(m.group(1)) < 1):
        raise ValueError(
            f"--topology: expected a GPU topology like h100:8 (8 GPUs on one node) or h100:4x8 (4 nodes of "
            f"8), GPU one of {', '.join(sorted(CARDS))}; found {topology!r}"
        )
    return CARDS[card.lower()], int(m.group(1) or 1), int(m.group(2))
