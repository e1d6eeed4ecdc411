"""One full BAT pretraining step: student forward + backward on V masked views per clip, EMA-teacher forward,
ViT decoder, AdamW update and EMA update, jitted (state donated), warm-up excluded.

    python -m benchmarks.step                 # tiny, then BAT-B (1 clip × bat_base's 16 views), CPU
    python -m benchmarks.step --size base --batch 48 --views 16 --dtype bfloat16      # a GPU / TPU
    python -m benchmarks.step --size tiny --dim 192 --depth 4 --heads 3 --decoder-depth 2 --batch 4 \
        --views 16 --iters 3      # the config timed side by side with the official code (RESULTS.md)

Reports compile time (AOT lower + compile; the jitted step reuses the executable), seconds per step (median
after one warm-up step), the jit cache size (stays 1: new mask keys never recompile), and the model FLOPs
counted two ways: analytically (see below) and by XLA (`compiled.cost_analysis()["flops"]`), each as
achieved FLOP/s and as a fraction of a large jitted matmul's FLOP/s measured in the same run.
Run as a script it first re-executes itself with glibc malloc asking for transparent huge pages, as
`bat-jax pretrain` does (`bat_jax/train/hostmem.py`; ``--host-malloc system`` keeps glibc's defaults);
`host_malloc` in the output says which.

The analytic count (matmuls only, forward + backward ≈ 3 forwards for the student and the decoder, the
teacher forward once) is `bat_jax.train.flops.flops_breakdown`, the formula the pretraining job's MFU uses.
Params are float32; ``--dtype bfloat16`` sets the computation dtype of the encoder and decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models import ssl_objective
from bat_jax.models.encoder import param_count
from bat_jax.train import config as train_config
from bat_jax.train import hostmem
from bat_jax.train.flops import flops_breakdown, measure_peak
from bat_jax.train.step import init_train_state, jit_train_step

SIZES = {"tiny": "tiny", "base": "bat_base"}  # --size → configs/pretrain/<name>.py


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "base", "both"], default="both", help="both: tiny, then base")
    p.add_argument("--batch", type=int, default=1, help="clips per step")
    p.add_argument("--views", type=int, default=None, help="masked views per clip (default: bat_base's)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default: bat_base's)")
    p.add_argument("--iters", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="computation dtype")
    p.add_argument("--remat", default="none", help="none, full or a jax.checkpoint_policies name")
    p.add_argument(
        "--scan-blocks",
        action="store_true",
        help="the encoder's blocks as one lax.scan (EncoderConfig.scan_blocks)",
    )
    p.add_argument("--matmul", type=int, default=4096, help="side of the square reference matmul (0: skip)")
    p.add_argument("--dim", type=int, default=None, help="encoder width (default: the size's)")
    p.add_argument("--depth", type=int, default=None, help="encoder blocks (default: the size's)")
    p.add_argument("--heads", type=int, default=None, help="encoder and decoder heads (default: the size's)")
    p.add_argument("--decoder-depth", type=int, default=None, help="decoder blocks (default: the size's)")
    p.add_argument(
        "--host-malloc",
        choices=hostmem.CHOICES,
        default="hugepages",
        help="hugepages: re-execute with glibc.malloc.hugetlb=1, as `bat-jax pretrain` runs "
        "(bat_jax/train/hostmem.py); system: glibc's defaults",
    )
    return p.parse_args(argv)


def make_config(size: str, args: argparse.Namespace) -> ssl_objective.SSLConfig:
    """The config's SSLConfig with the benchmark's dtype and remat policy, and the views and frames asked
    for (by default bat_base's for both sizes, so that tiny and BAT-B run the same masking workload)."""
    paper = train_config.ssl_preset("bat_base")
    views = paper.num_views if args.views is None else args.views
    frames = paper.frames if args.frames is None else args.frames
    cfg = train_config.ssl_preset(SIZES[size], num_views=views, frames=frames)
    arch = {"dim": args.dim, "depth": args.depth, "num_heads": args.heads}
    arch = {k: v for k, v in arch.items() if v is not None}
    encoder = cfg.encoder.replace(
        dtype=args.dtype, param_dtype="float32", remat_policy=args.remat, scan_blocks=args.scan_blocks, **arch
    )
    dec = {"decoder_depth": args.decoder_depth, "decoder_heads": args.heads}
    return cfg.replace(encoder=encoder, **{k: v for k, v in dec.items() if v is not None})


# ----------------------------------------------------------------------------------------------------
# FLOPs


def xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", float("nan")))


# ----------------------------------------------------------------------------------------------------


def bench(size: str, args: argparse.Namespace, peak: float | None) -> dict:
    cfg = make_config(size, args)
    tx = train_config.optimizer(train_config.pretrain_config(SIZES[size]))  # the config's AdamW + schedule
    t0 = time.perf_counter()
    state = init_train_state(cfg, tx, jax.random.key(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    spec = jnp.asarray(rng.random((args.batch, cfg.frames, cfg.encoder.n_mels), dtype=np.float32))
    key = jax.random.key(1)
    step = jit_train_step(cfg, tx)

    t0 = time.perf_counter()
    lowered = step.lower(state, spec, key)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    state, metrics = step(state, spec, jax.random.fold_in(key, 0))  # warm-up (reuses the executable)
    jax.block_until_ready(metrics)
    first_s = time.perf_counter() - t0
    times = []
    for i in range(args.iters):
        t0 = time.perf_counter()
        state, metrics = step(state, spec, jax.random.fold_in(key, i + 1))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))

    flops = flops_breakdown(cfg, args.batch)
    counted = xla_flops(compiled)
    result = {
        "size": size,
        "params_student": param_count(ssl_objective.abstract_params(cfg)),
        "batch_clips": args.batch,
        "views": cfg.num_views,
        "frames": cfg.frames,
        "dtype": args.dtype,
        "remat": args.remat,
        "scan_blocks": args.scan_blocks,
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x{jax.device_count()}",
        "host_malloc": hostmem.active(),
        "init_s": round(init_s, 2),
        "lower_s": round(lower_s, 2),
        "compile_s": round(compile_s, 2),
        "first_step_s": round(first_s, 3),
        "step_s_median": round(step_s, 3),
        "step_s_all": [round(t, 3) for t in times],
        "jit_cache_size": step._cache_size(),
        "loss": round(float(metrics["loss"]), 4),
        "flops_analytic": {k: f"{v:.4g}" for k, v in flops.items()},
        "flops_xla": f"{counted:.4g}",
        "flops_per_s_analytic": f"{flops['step'] / step_s:.4g}",
        "flops_per_s_xla": f"{counted / step_s:.4g}",
    }
    if peak:
        result["matmul_fraction_analytic"] = round(flops["step"] / step_s / peak, 3)
        result["matmul_fraction_xla"] = round(counted / step_s / peak, 3)
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    peak = None
    if args.matmul:
        peak = measure_peak(jax.devices()[0], args.dtype, args.matmul, statistic=np.median)
        side = args.matmul
        shape = f"{side}x{side} @ {side}x{side} {args.dtype}"
        print(json.dumps({"matmul": shape, "flops_per_s": f"{peak:.4g}"}))
    sizes = ["tiny", "base"] if args.size == "both" else [args.size]
    results = []
    for size in sizes:
        results.append(bench(size, args, peak))
        print(json.dumps(results[-1], indent=2), flush=True)
    return results


if __name__ == "__main__":
    os.environ[hostmem.ENV] = parse_args().host_malloc
    hostmem.maybe_reexec()  # as the job: the process restarts once with the tunables (unless "system")
    main()
