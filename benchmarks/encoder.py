"""Encoder forward throughput: BAT-B (random init), jitted, warm-up excluded.

    python -m benchmarks.encoder [--frames 1024] [--batch 8] [--iters 5] [--preset bat_base] [--dtype float32]

Reports init and compile time, clips/s and the jit cache size (should stay 1: one input shape).
Parameters are counted from `jax.eval_shape` and initialised once (one jitted init).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models import config as C
from bat_jax.models.encoder import FrozenEncoder, abstract_params, param_count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bat_base", choices=sorted(C.PRESETS))
    p.add_argument("--frames", type=int, default=1024, help="input frames (multiple of 16)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--iters", type=int, default=5, help="timed forward passes after the warm-up")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = C.PRESETS[args.preset](dtype=args.dtype, param_dtype=args.dtype)
    n_params = param_count(abstract_params(cfg))  # shapes only (eval_shape), nothing allocated
    t0 = time.perf_counter()
    enc = FrozenEncoder.random(cfg, seed=0)  # one jitted init
    jax.block_until_ready(enc.params)
    init_s = time.perf_counter() - t0

    spec = np.random.default_rng(0).random((args.batch, args.frames, cfg.n_mels), dtype=np.float32)
    spec = jnp.asarray(spec, cfg.dtype)
    t0 = time.perf_counter()
    jax.block_until_ready(enc(spec))  # compile + first run (warm-up, not timed below)
    first_s = time.perf_counter() - t0

    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(enc(spec))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    result = {
        "preset": args.preset,
        "params": n_params,
        "frames": args.frames,
        "batch": args.batch,
        "dtype": args.dtype,
        "device": str(jax.devices()[0].device_kind),
        "init_s": round(init_s, 2),
        "first_call_s": round(first_s, 2),
        "compile_s_est": round(first_s - step, 2),  # first call minus one warm step
        "step_s_median": round(step, 3),
        "clips_per_s": round(args.batch / step, 2),
        "jit_cache_size": enc.cache_size(),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
