"""Model FLOPs of a pretraining step, the device's peak FLOP/s and the MFU (model FLOPs utilisation).

    from bat_jax.train import flops
    per_step = flops.step_flops(ssl_config, global_batch)   # analytic, the whole (global) batch
    peak = flops.peak_flops(cfg, mesh.devices.flat)          # Peak(flops_per_s per device, source)
    flops.mfu(per_step, step_time_s, peak.flops_per_s, flops.peak_devices(mesh.devices.flat))

Analytic count (matmuls only; LayerNorm, GELU, softmax, masking and the optimizer are not counted):
    one block on n tokens of width D, MLP width M, per sequence:
        2·n·(3D² qkv + D² out + D² gate + 2·D·M mlp) + 4·n²·D (q·kᵀ, attn·v)  = 26·n·D² + 4·n²·D (M = 4D)
    student encoder: B·V sequences of K + 1 tokens (K = 102 kept + CLS), L blocks, + patch embedding
    decoder:         B·V sequences of N = 512 tokens, L_dec blocks, the last one computing only the
                     M = N − K masked tokens' outputs (q, k, v still projected for all N: 6·N·D² +
                     2·M·(D² + D² + 2·D·M_mlp) + 4·M·N·D), + output projection 2·M·D_dec·D
                     (+ input projection 2·K·D·D_dec when the decoder is narrower)
    teacher:         B sequences of N + 1 tokens, L blocks, + patch embedding (2·N·256·D per clip)
    step = 3 × (student + decoder) (forward + backward ≈ 3 forwards) + 1 × teacher (forward only)
Within ~10% of XLA's ``compiled.cost_analysis()["flops"]`` (benchmarks/step.py prints both).

The peak (per device): ``train.peak_flops_per_device`` when the config sets it (> 0); else the vendor's dense
figure for a known accelerator (`PEAK_TABLE`: TPUs at any compute dtype, as XLA's default float32 matmul
precision on TPU is one bfloat16 pass; GPUs at bfloat16 / float16 only); else measured once, a jitted
square matmul in the compute dtype on one local device (`measure_peak`). On a CPU the measured figure is
what a matmul reaches there with all the cores, so the CPU "MFU" compares the step with the best matmul of
the machine, counted once per process however many CPU devices it simulates (`peak_devices`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from bat_jax.models.masking import num_kept
from bat_jax.models.ssl_objective import SSLConfig

_WHERE = "bat_jax/train/flops.py"
PEAK_KEY = "peak_flops_per_device"  # cfg.train.<this>: FLOP/s per device, 0 = table or measured

# Dense (no sparsity) bfloat16 peak FLOP/s of one JAX device (a TPU v2 / v3 device is one of the chip's two
# cores), from the vendors' data sheets; matched as lower-case substrings of device_kind, first match first.
PEAK_TABLE: tuple[tuple[str, float], ...] = (
    ("tpu v2", 22.5e12),
    ("tpu v3", 61.5e12),
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),  # v5p's device_kind is "TPU v5" (or "TPU v5p")
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("a100", 312e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989e12),
)
_HALF_DTYPES = ("bfloat16", "float16")


class Peak(NamedTuple):
    """Peak FLOP/s of one device and where the figure came from (the run's first line says both)."""

    flops_per_s: float
    source: str


# ----------------------------------------------------------------------------------------------------
# Model FLOPs


def block_flops(n: int, d: int, mlp: int, gate: bool, queries: int | None = None) -> int:
    """Matmul FLOPs of one transformer block on one sequence of n tokens (forward); with ``queries`` m, only
    m tokens' outputs (`bat_jax.models.layers.Block` with ``rows``: q, k, v projected for all n tokens)."""
    m = n if queries is None else queries
    per_query = d * d + (d * d if gate else 0) + 2 * d * mlp  # out, gate, MLP
    return 2 * (n * 3 * d * d + m * per_query) + 4 * m * n * d


def flops_breakdown(config: SSLConfig, batch: int) -> dict[str, float]:
    """Forward matmul FLOPs of the student encoder, the decoder and the teacher on ``batch`` clips, and the
    step's total (module docstring): {"student_fwd", "decoder_fwd", "teacher_fwd", "step"}."""
    enc, dec = config.encoder, config.decoder
    n, k = config.num_patches, num_kept(config.num_patches, config.mask_ratio)
    rows = batch * config.num_views
    patch_area = enc.patch_size[0] * enc.patch_size[1]
    embed = 2 * batch * n * patch_area * enc.dim  # once per clip (the views gather from it)
    student = embed + rows * enc.depth * block_flops(k + 1, enc.dim, enc.mlp_dim, enc.use_gate)
    d_dec = dec.width
    mlp_dec = int(d_dec * dec.mlp_ratio)
    decoder = rows * (dec.depth - 1) * block_flops(n, d_dec, mlp_dec, dec.use_gate)
    decoder += rows * block_flops(n, d_dec, mlp_dec, dec.use_gate, queries=n - k)  # the masked outputs only
    decoder += 2 * rows * (n - k) * d_dec * enc.dim  # out_proj at the masked patches
    if d_dec != enc.dim:
        decoder += 2 * rows * k * enc.dim * d_dec  # in_proj
    teacher = embed + batch * enc.depth * block_flops(n + 1, enc.dim, enc.mlp_dim, enc.use_gate)
    return {
        "student_fwd": float(student),
        "decoder_fwd": float(decoder),
        "teacher_fwd": float(teacher),
        "step": float(3 * (student + decoder) + teacher),
    }


def step_flops(config: SSLConfig, global_batch: int) -> float:
    """Model FLOPs of one update on ``global_batch`` clips (all devices together; micro-batching does not
    change it)."""
    if global_batch < 1:
        raise ValueError(f"step_flops ({_WHERE}): expected a global batch >= 1 clip, found {global_batch}")
    return flops_breakdown(config, global_batch)["step"]


def mfu(flops_per_step: float, step_time_s: float, peak: float, devices: int) -> float:
    """Model FLOPs utilisation: ``flops_per_step / step_time_s / (peak × devices)``, ``peak`` the FLOP/s of
    one device; NaN when the step time, the peak or the device count is not positive."""
    if step_time_s <= 0 or peak <= 0 or devices <= 0:
        return float("nan")
    return flops_per_step / step_time_s / (peak * devices)


# ----------------------------------------------------------------------------------------------------
# Device peak


def table_peak(device_kind: str) -> float | None:
    """`PEAK_TABLE`'s bfloat16 FLOP/s for ``device_kind`` ("TPU v4", "NVIDIA H100 80GB HBM3", ...) or None."""
    kind = device_kind.lower()
    return next((value for name, value in PEAK_TABLE if name in kind), None)


def measure_peak(
    device: jax.Device,
    dtype: str = "float32",
    side: int | None = None,
    iters: int = 3,
    statistic: Callable[[list[float]], float] = min,
) -> float:
    """FLOP/s of a jitted [side, side] @ [side, side] matmul on ``device`` (``statistic`` of the times of
    ``iters`` calls after a warm-up: the fastest by default); ``side`` 2048 on a CPU (well under a second
    per call there), 8192 on an accelerator."""
    if side is None:
        side = 2048 if device.platform == "cpu" else 8192

    def operands() -> tuple[jax.Array, jax.Array]:
        keys = jax.random.split(jax.random.key(0))
        return tuple(jax.random.normal(k, (side, side), jnp.dtype(dtype)) for k in keys)

    # Made on the device by a jitted function without inputs: no host transfer (safe under the loop's
    # jax.transfer_guard("disallow")).
    a, b = jax.jit(operands, out_shardings=jax.sharding.SingleDeviceSharding(device))()
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - t0)
    return 2.0 * side**3 / float(statistic(times))


def compute_dtype(cfg: ml_collections.ConfigDict) -> str:
    """The encoder's computation dtype (cfg.encoder), e.g. "bfloat16"."""
    from bat_jax.train import config as config_lib

    return str(jnp.dtype(config_lib.encoder_config(cfg).dtype))


def configured_peak(cfg: ml_collections.ConfigDict) -> float:
    """cfg.train.peak_flops_per_device as a float (0 when absent or None); ValueError naming the field when it
    is not a number >= 0."""
    value = cfg.train.get(PEAK_KEY) if "train" in cfg else None
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(
            f"config train.{PEAK_KEY} ({_WHERE}): expected the FLOP/s of one device, a number >= 0 "
            f"(0: from a table or measured), found {value!r}"
        )
    return float(value)


def peak_devices(devices: Sequence[Any]) -> int:
    """How many per-device peaks add up to the peak of ``devices``: their number, except on CPUs, where a
    process's (simulated) devices share its cores and a measured matmul already used them all: the number of
    processes."""
    devices = list(devices)
    if devices and all(d.platform == "cpu" for d in devices):
        return len({d.process_index for d in devices})
    return len(devices)


def _local_device(devices: Sequence[Any] | None) -> jax.Device:
    here = jax.process_index()
    local = [d for d in (devices if devices is not None else []) if d.process_index == here]
    return local[0] if local else jax.local_devices()[0]


def peak_flops(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Peak:
    """The peak FLOP/s of one of ``devices`` (default: this process's first) and its source: the config's
    train.peak_flops_per_device, else `PEAK_TABLE` by device_kind, else `measure_peak` (module docstring)."""
    configured = configured_peak(cfg)
    if configured > 0:
        return Peak(configured, f"config train.{PEAK_KEY}")
    device, dtype = _local_device(devices), compute_dtype(cfg)
    known = table_peak(device.device_kind)
    if known is not None and (device.platform == "tpu" or dtype in _HALF_DTYPES):
        return Peak(known, f"table: {device.device_kind}, dense bfloat16")
    side = 2048 if device.platform == "cpu" else 8192
    measured = measure_peak(device, dtype, side)
    return Peak(measured, f"measured: {side}x{side} {dtype} matmul on {device.device_kind}")
