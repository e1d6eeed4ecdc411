"""The full pretraining job against its bare step: steady-state steps/s and clips/s of
`bat_jax.train.pretrain.run` (input pipeline and logging included) and of the compiled `train_step` alone on a
batch already on the devices, same config, same sitting, alternated round by round.

    python -m benchmarks.pretrain                          # tiny, 1024 frames, 1 device then the 4x2 mesh
    python -m benchmarks.pretrain --frames 256,1024 --mesh 1 --steps 30 --rounds 3
    python -m benchmarks.pretrain --mesh 4x2 --worker-count 1 --data data/demo   # a prepared folder
    python -m benchmarks.pretrain --breakdown             # also: where a batch's host time goes
    python -m benchmarks.pretrain --prefetch 0            # the job's loader without its prefetch thread

Meshes: ``1`` is one device without a mesh (the config's mesh section dropped), ``DxF`` the (data, fsdp) mesh
D x F. Each (mesh, frames) pair runs in its own subprocess with ``--xla_force_host_platform_device_count``
set to the mesh's size before jax is imported (simulated CPU devices; on an accelerator the devices must be
there). The data: random fp16 spectrograms written as uncompressed shards under a temporary folder
(``--data DIR``: a prepared folder at the same frames instead).

Per round: one job of ``--steps`` updates in a fresh workdir, then ``--steps - --log-every`` bare steps (the
compiled step of the same config, built once, on one device-resident batch). The job's steady state is
its metrics.jsonl after the first log window (which holds the first dispatches and the queue filling): the
wall time between the first and the last log line (each written after its step's metrics reached the host)
per step. Reported per (mesh, frames), median over rounds:

    job steps/s, clips/s       from that time per step
    bare steps/s               dispatch all, wait for the last
    job / bare                 step time ratio (issue 7 target <= 1.05)
    wait (job metric)          the job's data_wait_s / its step_time_s (log lines after the first)
    in next(loader)            time inside the loader's __next__ (timed here) / step time: the host's read,
                               decode, roll/crop and device placement of a batch while the device computes

``--breakdown`` times the pieces of one batch on an idle device (read, decode, roll/crop/pad, batch,
placement on the mesh and the cast), ms per batch, median over ``--breakdown-batches``.
Prints a table and one JSON line (``{"benchmark": "pretrain", ...}``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "pretrain" / "tiny.py")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=TINY, help="pretraining config file (default: tiny)")
    p.add_argument("--frames", default="1024", help="comma-separated frames per clip, e.g. 256,1024")
    p.add_argument("--mesh", default="1,4x2", help="comma-separated meshes: 1 (one device, no mesh) or DxF")
    p.add_argument("--steps", type=int, default=20, help="updates per job (the first log window excluded)")
    p.add_argument("--log-every", type=int, default=5, help="the job's train.log_every")
    p.add_argument("--rounds", type=int, default=2, help="job, bare, job, bare, ...")
    p.add_argument("--worker-count", type=int, default=None, help="data.worker_count (default: the config's)")
    p.add_argument("--batch", type=int, default=None, help="data.global_batch_size (default: the config's)")
    p.add_argument(
        "--prefetch", type=int, default=None, help="the job loader's prefetch (default: the loader's own)"
    )
    p.add_argument("--clips", type=int, default=64, help="clips in the synthetic data")
    p.add_argument("--data", default=None, help="a prepared folder at these frames instead of synthetic data")
    p.add_argument("--breakdown", action="store_true", help="also time a batch's pieces on an idle device")
    p.add_argument("--breakdown-batches", type=int, default=10)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one (mesh, frames) in-process
    args = p.parse_args(argv)
    if args.steps <= args.log_every:
        p.error(f"expected --steps > --log-every (the first log window is left out), found {args.steps}")
    return args


def parse_mesh(text: str) -> tuple[int, int] | None:
    """'1' → None (one device, no mesh); 'DxF' → (D, F)."""
    if text.strip() == "1":
        return None
    try:
        data, fsdp = (int(s) for s in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--mesh: expected 1 or DxF (e.g. 4x2), found {text!r}") from None
    return data, fsdp


def mesh_devices(mesh: tuple[int, int] | None) -> int:
    return 1 if mesh is None else mesh[0] * mesh[1]


# ----------------------------------------------------------------------------------------------------
# Data and config


def write_data(root: Path, num_clips: int, frames: int, num_mels: int = 128) -> Path:
    """Random fp16 clips (num_frames in [frames // 2, frames]) as two uncompressed shards in root/train/."""
    from bat_jax.data.shards import WRITER_OPTIONS
    from benchmarks.pipeline import write_shards

    (root / "train").mkdir(parents=True, exist_ok=True)
    write_shards(root / "train", num_clips, 2, frames, num_mels, WRITER_OPTIONS)
    return root


def make_config(args: argparse.Namespace, frames: int, mesh: tuple[int, int] | None, root: Path):
    from bat_jax.train.cli import parse_config

    overrides = [
        f"--config.data.root={root}",
        f"--config.frames={frames}",
        f"--config.train.steps={args.steps}",
        f"--config.train.log_every={args.log_every}",
        f"--config.train.checkpoint_every={args.steps}",
        f"--config.optim.warmup_steps={min(2, args.steps - 1)}",
    ]
    if args.worker_count is not None:
        overrides.append(f"--config.data.worker_count={args.worker_count}")
    if args.batch is not None:
        overrides.append(f"--config.data.global_batch_size={args.batch}")
    if mesh is not None:
        overrides += [f"--config.mesh.shape.data={mesh[0]}", f"--config.mesh.shape.fsdp={mesh[1]}"]
    cfg = parse_config(args.config, overrides)
    if mesh is None and "mesh" in cfg:
        with cfg.unlocked():
            del cfg["mesh"]  # one device, train/step.py's path (bat_jax/train/setup.py)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Timing


@contextlib.contextmanager
def timed_next(record: list[float]):
    """Append the wall time of every PretrainLoader.__next__ call to `record` (the job's loader included)."""
    from bat_jax.data import pipeline

    original = pipeline.PretrainLoader.__next__

    def __next__(self):
        start = time.perf_counter()
        try:
            return original(self)
        finally:
            record.append(time.perf_counter() - start)

    pipeline.PretrainLoader.__next__ = __next__
    try:
        yield record
    finally:
        pipeline.PretrainLoader.__next__ = original


@contextlib.contextmanager
def loader_prefetch(prefetch: int | None):
    """The job's loader with `prefetch` batches ahead (None: the loader's default)."""
    import functools

    from bat_jax.train import pretrain

    original = pretrain.make_pretrain_loader
    if prefetch is not None:
        pretrain.make_pretrain_loader = functools.partial(original, prefetch=prefetch)
    try:
        yield
    finally:
        pretrain.make_pretrain_loader = original


def run_job(cfg, workdir: Path, log_every: int, prefetch: int | None = None) -> dict:
    """One job in a fresh workdir; its steady state (metrics after the first log window)."""
    from bat_jax.train import pretrain
    from bat_jax.train.metrics import read_metrics

    shutil.rmtree(workdir, ignore_errors=True)
    lines: list[str] = []
    fetch: list[float] = []
    start = time.perf_counter()
    with timed_next(fetch), loader_prefetch(prefetch):
        rc = pretrain.run(cfg, workdir, progress=False, say=lines.append)
    wall = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"the job in {workdir} exited with {rc}: {lines[-3:]}")
    rows = read_metrics(workdir)
    steady = [m for m in rows if m["step"] > log_every]
    # Between the first and the last log line: each is written after a device_get of its step's metrics,
    # so the span is the device time of the steps in between plus whatever the loop adds (the job's own
    # step_time_s windows start before that sync and are off by the queued steps at both ends).
    step_time = (rows[-1]["time"] - rows[0]["time"]) / (rows[-1]["step"] - rows[0]["step"])
    job_metric = sum(m["step_time_s"] for m in steady) / len(steady)
    wait = sum(m["data_wait_s"] for m in steady) / len(steady)
    in_next = sum(fetch[log_every:]) / max(len(fetch) - log_every, 1)
    return {
        "step_s": step_time,
        "step_time_s_job_metric": job_metric,
        "data_wait_s": wait,
        "in_next_s": in_next,
        "wall_s": wall,
        "first_line": lines[0] if lines else "",
    }


class Bare:
    """The config's compiled step on one device-resident batch (built once; state donated step to step)."""

    def __init__(self, cfg):
        import jax

        from bat_jax.data.pipeline import make_pretrain_loader, shard_paths
        from bat_jax.train import config as config_lib
        from bat_jax.train import setup as setup_lib

        self.job = setup_lib.build(cfg)
        paths = shard_paths(cfg.data.root, cfg.data.split)
        kwargs = {**config_lib.loader_kwargs(cfg), "worker_count": 0}
        with make_pretrain_loader(paths, sharding=self.job.batch_sharding, **kwargs) as loader:
            self.spec = jax.block_until_ready(next(loader)["spec"])  # on the devices before timing
            self.state = self.job.init_state()
            self.rng = jax.device_put(jax.random.key(int(cfg.train.seed)), self.job.replicated)
            self.step_fn, _ = self.job.compile(self.state, self.rng, loader)
        self.run(1)  # warm-up

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps dispatched back to back (waits for the last); the keys are
        made and placed before the clock starts."""
        import jax

        keys = jax.random.split(self.rng, steps)
        keys = [jax.block_until_ready(jax.device_put(k, self.job.replicated)) for k in keys]
        start = time.perf_counter()
        metrics = None
        for key in keys:
            self.state, metrics = self.step_fn(self.state, self.spec, key)
        jax.block_until_ready((self.state, metrics))
        self.rng = jax.random.fold_in(self.rng, steps)
        return (time.perf_counter() - start) / steps


def breakdown(cfg, batch_sharding, batches: int) -> dict[str, float]:
    """ms per batch of each piece of the loader's work, on an idle device (median over `batches`)."""
    import jax
    import numpy as np

    from bat_jax.data import records
    from bat_jax.data.pipeline import BatchPlacement, ShardSource, shard_paths
    from bat_jax.data.transforms import clip_example, record_offset
    from bat_jax.train import config as config_lib

    source = ShardSource(shard_paths(cfg.data.root, cfg.data.split))
    kwargs = config_lib.loader_kwargs(cfg)
    batch, frames = int(cfg.data.global_batch_size), kwargs["target_frames"]
    place = BatchPlacement(np.dtype(np.float32), batch_sharding, batch)
    times: dict[str, list[float]] = {k: [] for k in ("read", "decode", "roll_crop_pad", "batch", "place")}
    rng = np.random.default_rng(0)
    for _ in range(batches + 1):  # the first is a warm-up (compiles the cast)
        indices = rng.choice(len(source), batch, replace=False)
        t0 = time.perf_counter()
        raw = [source._shards[s][i] for s, i in (source._locate(int(j)) for j in indices)]
        t1 = time.perf_counter()
        clips = [records.decode(r) for r in raw]
        t2 = time.perf_counter()
        examples = [
            clip_example((int(j), c), frames, None, record_offset(0, 0, int(j), int(c["num_frames"])))
            for j, c in zip(indices, clips, strict=True)
        ]
        t3 = time.perf_counter()
        stacked = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
        t4 = time.perf_counter()
        jax.block_until_ready(place(stacked))
        t5 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            times[key].append(value)
    return {k: round(1e3 * float(np.median(v[1:])), 2) for k, v in times.items()}


# ----------------------------------------------------------------------------------------------------


def run_one(args: argparse.Namespace, frames: int, mesh: tuple[int, int] | None) -> dict:
    """Alternated rounds of job and bare step for one (mesh, frames), in this process."""
    import jax
    import numpy as np

    need = mesh_devices(mesh)
    if jax.device_count() < need:
        raise SystemExit(
            f"--mesh {mesh[0]}x{mesh[1]}: expected {need} devices, found {jax.device_count()} "
            f"({jax.default_backend()}); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={need}"
        )
    with tempfile.TemporaryDirectory(prefix="bat_jax_bench_pretrain_") as tmp:
        root = Path(args.data) if args.data else write_data(Path(tmp) / "data", args.clips, frames)
        cfg = make_config(args, frames, mesh, root)
        load_before = os.getloadavg()[0]
        bare = Bare(cfg)
        bare_steps = args.steps - args.log_every
        rounds = []
        for r in range(args.rounds):
            job = run_job(cfg, Path(tmp) / f"job{r}", args.log_every, args.prefetch)
            job["bare_step_s"] = bare.run(bare_steps)
            rounds.append(job)
        extra = {}
        if args.breakdown:
            extra["breakdown_ms"] = breakdown(cfg, bare.job.batch_sharding, args.breakdown_batches)
        load_after = os.getloadavg()[0]

    def med(key):
        return float(np.median([r[key] for r in rounds]))

    batch = int(cfg.data.global_batch_size)
    job_s, bare_s = med("step_s"), med("bare_step_s")
    return {
        "mesh": "1" if mesh is None else f"{mesh[0]}x{mesh[1]}",
        "frames": frames,
        "batch": batch,
        "worker_count": int(cfg.data.worker_count),
        "prefetch": args.prefetch,
        "steady_steps": args.steps - args.log_every,
        "rounds": args.rounds,
        "job_steps_per_s": round(1 / job_s, 4),
        "job_clips_per_s": round(batch / job_s, 2),
        "bare_steps_per_s": round(1 / bare_s, 4),
        "job_over_bare": round(float(np.median([r["step_s"] / r["bare_step_s"] for r in rounds])), 3),
        "wait_fraction_job_metric": round(med("data_wait_s") / med("step_time_s_job_metric"), 3),
        "in_next_fraction": round(med("in_next_s") / job_s, 4),
        "rounds_detail": [{k: round(v, 4) for k, v in r.items() if isinstance(v, float)} for r in rounds],
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x{jax.device_count()}",
        "cpus": os.cpu_count(),
        "load_average": [round(load_before, 1), round(load_after, 1)],
        "first_line": rounds[0]["first_line"],
        **extra,
    }


def child_command(args: argparse.Namespace, frames: int, mesh_text: str) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.pretrain", "--child", "--mesh", mesh_text]
    cmd += ["--frames", str(frames)]
    passed = ("config", "steps", "log_every", "rounds", "worker_count", "batch", "prefetch", "clips", "data")
    for flag in passed:
        value = getattr(args, flag)
        if value is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(value)]
    if args.breakdown:
        cmd += ["--breakdown", "--breakdown-batches", str(args.breakdown_batches)]
    return cmd


def child_env(devices: int) -> dict[str, str]:
    """This environment with the simulated host devices set to `devices` (other XLA flags kept)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


HEADER = (
    "| mesh | frames | clips/step | workers | job steps/s | job clips/s | bare steps/s | job / bare "
    "| data wait (job metric) | in next(loader) |\n|---|---|---|---|---|---|---|---|---|---|"
)


def row(r: dict) -> str:
    return (
        f"| {r['mesh']} | {r['frames']} | {r['batch']} | {r['worker_count']} | {r['job_steps_per_s']:.3f} "
        f"| {r['job_clips_per_s']:.1f} | {r['bare_steps_per_s']:.3f} | {r['job_over_bare']:.3f} "
        f"| {100 * r['wait_fraction_job_metric']:.1f} % | {100 * r['in_next_fraction']:.2f} % |"
    )


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    frames_list = [int(f) for f in args.frames.split(",")]
    meshes = [m.strip() for m in args.mesh.split(",")]
    if args.child:
        result = run_one(args, frames_list[0], parse_mesh(meshes[0]))
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return [result]
    results = []
    for mesh_text in meshes:
        mesh = parse_mesh(mesh_text)
        for frames in frames_list:
            cmd = child_command(args, frames, mesh_text)
            done = subprocess.run(
                cmd, env=child_env(mesh_devices(mesh)), cwd=REPO, capture_output=True, text=True, check=False
            )
            found = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_RESULT ")]
            if done.returncode or not found:
                sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
                raise SystemExit(f"benchmarks.pretrain: the run for mesh {mesh_text}, {frames} frames failed")
            results.append(json.loads(found[-1].removeprefix("BENCH_RESULT ")))
            print(row(results[-1]) if len(results) > 1 else HEADER + "\n" + row(results[-1]), flush=True)
    print(f"\n{results[0]['first_line']}")
    print(json.dumps({"benchmark": "pretrain", "results": results}))
    return results


if __name__ == "__main__":
    main()
