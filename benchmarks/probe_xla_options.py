"""The probe's jitted steps compiled with XLA's default options vs the job's (`bat_jax.models.xla_options`: on
CPU no YNNPACK fusions), in one process, rounds alternated.

    python -m benchmarks.probe_xla_options            # encoder 192 / 4 / 3, 1024 frames, batch 16, K = 1,000

Steps: CGP with the encoder recomputed, CGP on cached tokens (the feature cache's step), VQT (backward through
the encoder), and the encoder forward alone. Prints one JSON line: per step the medians (s) of each round
and the ratio default / job's of their medians.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models import xla_options
from bat_jax.models.config import PRESETS
from bat_jax.models.encoder import FrozenEncoder
from bat_jax.probe import cache as cache_lib
from bat_jax.probe import heads as heads_lib
from bat_jax.probe import step as step_lib
from bat_jax.train.config import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prototypes", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=5, help="timed steps per round, after one warm-up")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    enc_cfg = PRESETS["bat_base"](dim=192, depth=4, num_heads=3, dtype="float32", param_dtype="float32")
    enc = FrozenEncoder.random(enc_cfg)
    cfg = load("configs/probe/base.py")
    cfg.probe.num_prototypes, cfg.probe.dropout_rate = args.prototypes, 0.0
    cfg.train.steps, cfg.optim.warmup_steps = 1000, 10
    rng = np.random.default_rng(0)
    spec = jnp.asarray(rng.random((args.batch, 1024, enc_cfg.n_mels), dtype=np.float32))
    labels = jnp.asarray(np.eye(50, dtype=np.float32)[rng.integers(0, 50, args.batch)])
    forward = step_lib.encoder_forward(enc_cfg)
    cls, patches = jax.jit(forward)(enc.params, spec)
    cached = {"cls": jnp.moveaxis(cls, 0, 1), "patches": jnp.moveaxis(patches, 0, 1)}
    cached = {"spec": jax.tree.map(lambda x: x.astype(jnp.bfloat16), cached), "labels": labels}
    recompute = {"spec": spec, "labels": labels}
    options = {"default": {}, "job": xla_options.inference()}

    def step_runner(names, fwd, batch, opts):
        heads = heads_lib.build(names, cfg, 50, enc_cfg.depth, enc_cfg.dim, encoder=enc_cfg)
        abstract = jax.eval_shape(lambda k: step_lib.init_params_of(heads, k), jax.random.key(0))
        tx = heads_lib.optimizer(cfg, abstract)
        loss = heads_lib.loss_fn("cross_entropy")
        step = step_lib.jit_train_step(fwd, heads, tx, loss, cfg, compiler_options=opts)
        box = [step_lib.init_state(heads, tx, heads_lib.members(cfg))]

        def run():
            box[0], parts = step(box[0], enc.params, batch)
            return box[0], parts

        return run, step

    def forward_runner(opts):
        f = jax.jit(forward, compiler_options=opts)
        return (lambda: f(enc.params, spec)), f

    cases = {
        "cgp_recompute": lambda o: step_runner(("cgp",), forward, recompute, o),
        "cgp_cached": lambda o: step_runner(("cgp",), cache_lib.cached_forward, cached, o),
        "vqt": lambda o: step_runner(("vqt",), forward, recompute, o),
        "forward": forward_runner,
    }
    runners = {(c, o): make(options[o]) for c, make in cases.items() for o in options}
    times = {key: [] for key in runners}
    for _ in range(args.rounds):
        for key, (run, _) in runners.items():
            jax.block_until_ready(run())  # warm-up (and compile, the first round)
            ts = []
            for _ in range(args.iters):
                t0 = time.perf_counter()
                jax.block_until_ready(run())
                ts.append(time.perf_counter() - t0)
            times[key].append(round(float(np.median(ts)), 4))
    result = {"options": options, "batch": args.batch, "prototypes": args.prototypes, "steps": {}}
    for case in cases:
        d, j = times[(case, "default")], times[(case, "job")]
        result["steps"][case] = {
            "default_s": d,
            "job_s": j,
            "default_over_job": round(float(np.median(d) / np.median(j)), 2),
            "jit_cache": [runners[(case, o)][1]._cache_size() for o in options],
        }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
