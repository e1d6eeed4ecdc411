"""A probing epoch with the feature cache against one that recomputes the frozen encoder every step.

    python -m benchmarks.probe_epoch             # encoder 192 / 4 / 3, 1024 frames, 64 clips, batch 16
    python -m benchmarks.probe_epoch --size bat_base --clips 16 --batch 4

Both epochs run the job's own pieces: `bat_jax.probe.step.jit_train_step` with the encoder's forward
(recompute) or with `cache.cached_forward` on batches of a `cache.FeatureCache` in memory (`CachedBatches`:
host gather of bfloat16 rows, placed on the device). Clips are random spectrograms (the cost does not depend
on the values). Reported: seconds per epoch (median of `--repeats`), the cache's one-off build, and the
ratio recompute / cached (the issue's target: >= 10x). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import numpy as np

from bat_jax.models.config import EncoderConfig
from bat_jax.models.encoder import FrozenEncoder
from bat_jax.probe import cache as cache_lib
from bat_jax.probe import heads as heads_lib
from bat_jax.probe import step as step_lib
from bat_jax.train.config import load

SIZES = {"tiny": dict(dim=192, depth=4, num_heads=3), "bat_base": dict(dim=768, depth=12, num_heads=12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--clips", type=int, default=64, help="clips per epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--prototypes", type=int, default=1000)
    ap.add_argument("--probes", default="cgp")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    enc_cfg = EncoderConfig(**SIZES[args.size])
    enc = FrozenEncoder.random(enc_cfg)
    cfg = load("configs/probe/base.py")
    cfg.probe.num_prototypes, cfg.train.steps, cfg.optim.warmup_steps = args.prototypes, 10_000, 10
    names = heads_lib.probe_names(args.probes)
    heads = heads_lib.build(names, cfg, args.classes, enc_cfg.depth, enc_cfg.dim)
    tx = heads_lib.optimizer(
        cfg, jax.eval_shape(lambda k: step_lib.init_params_of(heads, k), jax.random.key(0))
    )
    loss = heads_lib.loss_fn("cross_entropy")
    forward = step_lib.encoder_forward(enc_cfg)
    recompute = step_lib.jit_train_step(forward, heads, tx, loss, cfg)
    cached = step_lib.jit_train_step(cache_lib.cached_forward, heads, tx, loss, cfg)

    rng = np.random.default_rng(0)
    specs = rng.uniform(0, 1, (args.clips, args.frames, 128)).astype(np.float32)
    labels = np.eye(args.classes, dtype=np.float32)[rng.integers(0, args.classes, args.clips)]
    batches = [
        {"spec": specs[i : i + args.batch], "labels": labels[i : i + args.batch]}
        for i in range(0, args.clips - args.batch + 1, args.batch)
    ]

    tokens, grid = cache_lib.tokens_per_clip(args.frames, enc_cfg)
    cache = cache_lib.FeatureCache(args.clips, enc_cfg.depth, grid, enc_cfg.dim, args.classes, "memory", None)
    encode = jax.jit(forward)
    start = time.perf_counter()
    for i, b in enumerate(batches):
        cls, patches = jax.device_get(encode(enc.params, b["spec"]))
        rows = np.arange(i * args.batch, (i + 1) * args.batch)
        cache.put(rows, cls, patches, b["labels"])
    build_s = time.perf_counter() - start
    feeder = cache_lib.CachedBatches(cache, args.batch, 0, None)

    def epoch(step, get_batch) -> float:
        state = step_lib.init_state(heads, tx, heads_lib.members(cfg))
        state, _ = step(state, enc.params, get_batch(0))  # compile / warm-up, not timed
        jax.block_until_ready(state)
        start = time.perf_counter()
        for i in range(len(batches)):
            state, parts = step(state, enc.params, get_batch(i))
        jax.block_until_ready((state, parts))
        return time.perf_counter() - start

    times = {"recompute": [], "cached": []}
    for _ in range(args.repeats):  # alternate: one sitting
        times["recompute"].append(epoch(recompute, lambda i: batches[i]))
        times["cached"].append(epoch(cached, lambda i: next(feeder)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
                "size": args.size,
                "frames": args.frames,
                "clips": args.clips,
                "batch": args.batch,
                "probes": list(names),
                "cache_bytes": cache_lib.bytes_per_clip(enc_cfg.depth, tokens, enc_cfg.dim) * args.clips,
                "cache_build_s": round(build_s, 3),
                "epoch_recompute_s": [round(t, 3) for t in times["recompute"]],
                "epoch_cached_s": [round(t, 3) for t in times["cached"]],
                "speedup": round(med["recompute"] / med["cached"], 2),
                "jit_cache": {"recompute": recompute._cache_size(), "cached": cached._cache_size()},
            }
        )
    )


if __name__ == "__main__":
    main()
