"""The probing job's jitted step: one frozen encoder forward (recomputed every step, no gradient) feeding
every requested probe, their backward, and one AdamW update over all probes (`bat_jax.probe.step`).

    python -m benchmarks.probe                                   # CGP alone: the anchor config (below)
    python -m benchmarks.probe --probes cgp --probes cgp,cgp_patch_avg,lcgp,h2t,lp,protobin   # 6 vs 1
    python -m benchmarks.probe --size bat_base --batch 4         # BAT-B (768 / 12 / 12)

The anchor config matches the CGP probe step of `../shared/tools/bench_reference.py` at its defaults: an
encoder 192 wide, 4 blocks, 3 heads (`--size tiny`), 1024 frames × 128 mel bins, batch 16 (its 4 × 4 clips),
1,000 prototypes, 50 classes, softmax cross-entropy on one label per clip, float32 (its CPU run has no
autocast), head dropout 0 (its ViT's `head_dropout` default) and AdamW over the head's parameters only.

Each `--probes` set gets its own jitted step (compiled ahead of time, not timed); then `--rounds` rounds
alternate the sets, each timing `--iters` steps after one warm-up step, so that the sets' ratio comes from
one sitting. Reported per set: the median, min and max seconds per step over every timed step, the jit
cache size (stays 1: one batch shape) and the ratio of each set's median to the first set's.
``--forward`` also times the frozen encoder forward alone (jitted), the floor under every probe step.
``--xla-options default`` compiles with XLA's own options instead of the job's (`bat_jax.models.xla_options`:
on CPU no YNNPACK fusions).
Run as a script it re-executes itself with glibc malloc asking for transparent huge pages, as
`bat-jax probe` does (`bat_jax/train/hostmem.py`; ``--host-malloc system`` keeps glibc's defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.models import xla_options
from bat_jax.models.config import PRESETS
from bat_jax.models.encoder import FrozenEncoder
from bat_jax.probe import heads as heads_lib
from bat_jax.probe import step as step_lib
from bat_jax.train import hostmem
from bat_jax.train.config import load

# --size → encoder; "tiny" is bench_reference.py's default encoder (not the 64-wide test preset)
SIZES = {"tiny": {"dim": 192, "depth": 4, "num_heads": 3}, "bat_base": {}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--probes", action="append", help="a comma-separated probe set; repeat to compare sets (default cgp)"
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="tiny: 192/4/3; bat_base: 768/12/12")
    p.add_argument("--batch", type=int, default=16, help="clips per step")
    p.add_argument("--frames", type=int, default=1024, help="frames per clip (multiple of 16)")
    p.add_argument("--classes", type=int, default=50)
    p.add_argument("--prototypes", type=int, default=1000, help="K of CGP and ProtoBin")
    p.add_argument("--loss", choices=["cross_entropy", "bce"], default="cross_entropy")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="encoder compute")
    p.add_argument("--dropout", type=float, default=0.0, help="probe.dropout_rate (the config's is 0.2)")
    p.add_argument("--iters", type=int, default=3, help="timed steps per set and round, after one warm-up")
    p.add_argument("--rounds", type=int, default=2, help="rounds alternating the probe sets")
    p.add_argument("--forward", action="store_true", help="also time the frozen encoder forward alone")
    p.add_argument(
        "--xla-options",
        choices=["inference", "default"],
        default="inference",
        help="inference: the job's compile options (bat_jax.models.xla_options); default: XLA's own",
    )
    p.add_argument(
        "--host-malloc",
        choices=hostmem.CHOICES,
        default="hugepages",
        help="hugepages: re-execute with glibc.malloc.hugetlb=1, as `bat-jax probe` runs; system: glibc's",
    )
    return p.parse_args(argv)


def probe_config(args: argparse.Namespace):
    cfg = load("configs/probe/base.py")
    cfg.probe.num_prototypes = args.prototypes
    cfg.probe.dropout_rate = args.dropout
    cfg.train.steps = 1000
    cfg.optim.warmup_steps = 10
    return cfg


def make_batch(args: argparse.Namespace, n_mels: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    spec = rng.random((args.batch, args.frames, n_mels), dtype=np.float32)
    if args.loss == "cross_entropy":  # one label per clip, as one-hot rows
        labels = np.eye(args.classes, dtype=np.float32)[rng.integers(0, args.classes, args.batch)]
    else:
        labels = (rng.random((args.batch, args.classes)) < 0.1).astype(np.float32)
    return {"spec": jnp.asarray(spec), "labels": jnp.asarray(labels)}


def compiler_options(args: argparse.Namespace) -> dict | None:
    """The XLA compile options `--xla-options` names ({} = XLA's defaults)."""
    return xla_options.inference(encoder_dtype=args.dtype) if args.xla_options == "inference" else {}


class ProbeSet:
    """One probe set's state and jitted step, compiled ahead of time."""

    def __init__(self, names: tuple[str, ...], enc: FrozenEncoder, cfg, args, batch):
        self.names, self.times = names, []
        c = enc.config
        heads = heads_lib.build(names, cfg, args.classes, c.depth, c.dim)
        abstract = jax.eval_shape(lambda k: step_lib.init_params_of(heads, k), jax.random.key(0))
        tx = heads_lib.optimizer(cfg, abstract)
        self.state = step_lib.init_state(heads, tx, heads_lib.members(cfg))
        self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
        loss = heads_lib.loss_fn(args.loss)
        self.step = step_lib.jit_train_step(
            step_lib.encoder_forward(c), heads, tx, loss, cfg, compiler_options=compiler_options(args)
        )
        t0 = time.perf_counter()
        self.step.lower(self.state, enc.params, batch).compile()  # the jitted call reuses the executable
        self.compile_s = time.perf_counter() - t0

    def run(self, enc: FrozenEncoder, batch, iters: int) -> dict:
        self.state, losses = self.step(self.state, enc.params, batch)  # warm-up (state donated: rebind)
        jax.block_until_ready(losses)
        for _ in range(iters):
            t0 = time.perf_counter()
            self.state, losses = self.step(self.state, enc.params, batch)
            jax.block_until_ready((self.state, losses))
            self.times.append(time.perf_counter() - t0)
        return losses


def summary(times: list[float]) -> dict:
    return {
        "step_s_median": round(float(np.median(times)), 4),
        "step_s_min": round(min(times), 4),
        "step_s_max": round(max(times), 4),
        "step_s_all": [round(t, 4) for t in times],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sets = [heads_lib.probe_names(s) for s in (args.probes or ["cgp"])]
    enc_cfg = PRESETS["bat_base"](**SIZES[args.size], dtype=args.dtype, param_dtype="float32")
    enc = FrozenEncoder.random(enc_cfg)
    jax.block_until_ready(enc.params)
    cfg = probe_config(args)
    batch = make_batch(args, enc_cfg.n_mels)
    probes = [ProbeSet(names, enc, cfg, args, batch) for names in sets]

    forward, fwd_times = None, []
    if args.forward:
        forward = jax.jit(step_lib.encoder_forward(enc_cfg), compiler_options=compiler_options(args))
        jax.block_until_ready(forward(enc.params, batch["spec"]))  # compile + warm-up

    losses = {}
    for r in range(args.rounds):
        order = probes if r % 2 == 0 else probes[::-1]  # neither set always runs first
        for ps in order:
            last = ps.run(enc, batch, args.iters)
            losses[",".join(ps.names)] = {k: round(float(v[0]), 4) for k, v in last.items()}
        if forward is not None:
            for _ in range(args.iters):
                t0 = time.perf_counter()
                jax.block_until_ready(forward(enc.params, batch["spec"]))
                fwd_times.append(time.perf_counter() - t0)

    dev = jax.devices()[0]
    result = {
        "size": args.size,
        "encoder": [enc_cfg.dim, enc_cfg.depth, enc_cfg.num_heads, args.dtype],  # width, blocks, heads
        "batch": args.batch,
        "frames": args.frames,
        "classes": args.classes,
        "prototypes": args.prototypes,
        "loss": args.loss,
        "dropout": args.dropout,
        "xla_options": compiler_options(args),
        "iters_x_rounds": [args.iters, args.rounds],
        "device": f"{dev.platform}: {dev.device_kind} x{jax.device_count()}",
        "host_malloc": hostmem.active(),
        "sets": [],
    }
    base = float(np.median(probes[0].times))
    for ps in probes:
        key = ",".join(ps.names)
        result["sets"].append(
            {
                "probes": key,
                "probe_params": ps.n_params,
                "compile_s": round(ps.compile_s, 2),
                **summary(ps.times),
                "ratio_to_first": round(float(np.median(ps.times)) / base, 3),
                "jit_cache_size": ps.step._cache_size(),
                "loss": losses[key],
            }
        )
    if forward is not None:
        result["forward"] = {**summary(fwd_times), "jit_cache_size": forward._cache_size()}
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    os.environ[hostmem.ENV] = parse_args().host_malloc
    hostmem.maybe_reexec()  # as the job: the process restarts once with the tunables (unless "system")
    main()
