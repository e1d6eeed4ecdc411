"""Throughput of the pretraining input pipeline (clips/s), by Grain worker count.

    python -m benchmarks.pipeline [--clips 2000] [--batch 48] [--seconds 5] [--workers 0,1,2]

Writes random shards of fp16 [1024, 128] spectrograms (varying num_frames) in a temporary directory, then
times `bat_jax.data.pipeline.make_pretrain_loader` after a warm-up: numpy output (no device transfer) in
the asked dtype and in float16 (the workers' own output, no host-side cast), and global jax.Arrays on this
machine's devices (float16 transfer + cast on the device; `--no-device` skips it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import jax
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from jax.sharding import NamedSharding, PartitionSpec

from bat_jax.data import pipeline, records
from bat_jax.data.shards import WRITER_OPTIONS


def write_shards(
    directory: Path, num_clips: int, num_shards: int, frames: int, num_mels: int, options: str
) -> list[str]:
    """Random fp16 [frames, num_mels] clips, num_frames uniform in [frames // 2, frames]."""
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(num_shards):
        path = directory / f"train-{shard:05d}-of-{num_shards:05d}.arrayrecord"
        writer = ArrayRecordWriter(str(path), options)
        for index in range(num_clips * shard // num_shards, num_clips * (shard + 1) // num_shards):
            num_frames = int(rng.integers(frames // 2, frames + 1))
            spec = np.zeros((frames, num_mels), np.float16)  # [T, F]
            spec[:num_frames] = rng.random((num_frames, num_mels), np.float32)
            labels = tuple(int(c) for c in rng.choice(527, 2, replace=False))
            writer.write(records.encode(records.Clip(spec, num_frames, f"clip{index}", labels)))
        writer.close()
        paths.append(str(path))
    return paths


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 where unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _workers_cpu_seconds() -> float:
    return sum(_cpu_seconds(child.pid) for child in multiprocessing.active_children())


def measure(loader, batch_size: int, warmup_batches: int, seconds: float) -> dict[str, float]:
    """Clips/s over `seconds` after `warmup_batches` (device arrays are waited for), and the CPU seconds
    the main process and the worker processes spent meanwhile (the machine may be shared: CPU time says
    what a dedicated core would do)."""
    for _ in range(warmup_batches):
        jax.block_until_ready(next(loader))
    count, workers_cpu, main_cpu = 0, _workers_cpu_seconds(), time.process_time()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        jax.block_until_ready(next(loader))
        count += 1
    wall = time.perf_counter() - start
    return {
        "clips_per_s": count * batch_size / wall,
        "clips": count * batch_size,
        "main_cpu_s": time.process_time() - main_cpu,
        "workers_cpu_s": _workers_cpu_seconds() - workers_cpu,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--mels", type=int, default=128)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=5, help="batches drawn before timing")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated Grain worker counts")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="spec output dtype"
    )
    parser.add_argument(
        "--writer-options", default=WRITER_OPTIONS, help="ArrayRecord writer options (the prepare command's)"
    )
    parser.add_argument("--no-device", dest="device", action="store_false", help="skip the device_put runs")
    args = parser.parse_args()

    load_before = f"{os.getloadavg()[0]:.1f}"
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    with tempfile.TemporaryDirectory(prefix="bat_jax_pipeline_bench_") as tmp:
        start = time.perf_counter()
        paths = write_shards(Path(tmp), args.clips, args.shards, args.frames, args.mels, args.writer_options)
        mib = sum(Path(p).stat().st_size for p in paths) / 2**20
        print(
            f"wrote {args.clips} clips of fp16 [{args.frames}, {args.mels}] in {args.shards} shards "
            f"({mib:.0f} MiB, {args.writer_options!r}) in {time.perf_counter() - start:.1f} s"
        )
        runs = [("numpy", None, args.dtype), ("numpy", None, "float16")]
        if args.device:
            runs.append((f"jax.Array on {jax.default_backend()}", sharding, args.dtype))
        rows = []
        for workers in [int(w) for w in args.workers.split(",")]:
            for output, placement, dtype in runs:
                with pipeline.make_pretrain_loader(
                    paths,
                    global_batch_size=args.batch,
                    target_frames=args.frames,
                    sharding=placement,
                    worker_count=workers,
                    dtype=dtype,
                    num_classes=527,
                ) as loader:
                    result = measure(loader, args.batch, args.warmup, args.seconds)
                rows.append((workers, f"{output} {dtype}", result))
                print(f"  {_row(workers, f'{output} {dtype}', result)}", flush=True)

    print(f"\nbatch {args.batch}, spec [{args.frames}, {args.mels}], {args.seconds:.0f} s each")
    print(f"{os.cpu_count()} CPUs; load average before/after: {load_before} / {os.getloadavg()[0]:.1f}")
    print(HEADER)
    for row in rows:
        print(_row(*row))
    fresh, reused = shared_memory_cost(args.batch * args.frames * args.mels * 2)
    print(
        f"\nfilling one fp16 batch ({args.batch} clips): {fresh:.1f} ms in a fresh shared-memory segment "
        f"(how Grain hands each batch from a worker to the main process) vs {reused:.1f} ms in reused "
        f"memory, i.e. {fresh / args.batch:.2f} ms per clip of worker time spent on new pages"
    )


def shared_memory_cost(nbytes: int, repeats: int = 20) -> tuple[float, float]:
    """ms to fill `nbytes` in a new shared-memory segment each time vs in one reused buffer."""
    src = np.ones(nbytes, np.uint8)
    start = time.perf_counter()
    for _ in range(repeats):
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        view = np.ndarray(nbytes, np.uint8, buffer=shm.buf)
        view[:] = src
        del view
        shm.close()
        shm.unlink()
    fresh = (time.perf_counter() - start) / repeats * 1e3
    dst = np.empty_like(src)
    start = time.perf_counter()
    for _ in range(repeats):
        dst[:] = src
    return fresh, (time.perf_counter() - start) / repeats * 1e3


HEADER = (
    "| worker_count | output | clips/s | clips/s per worker | main CPU % | workers CPU % "
    "| clips per CPU-second of the workers (of main when 0) |\n|---|---|---|---|---|---|---|"
)


def _row(workers: int, output: str, r: dict[str, float]) -> str:
    busy = r["workers_cpu_s"] if workers else r["main_cpu_s"]
    per_worker = f"{r['clips_per_s'] / workers:,.0f}" if workers else "-"
    return (
        f"| {workers} | {output} | {r['clips_per_s']:,.0f} | {per_worker} "
        f"| {100 * r['main_cpu_s'] / r['wall_s']:.0f} | {100 * r['workers_cpu_s'] / r['wall_s']:.0f} "
        f"| {r['clips'] / max(busy, 1e-9):,.0f} |"
    )


if __name__ == "__main__":
    main()
