"""Throughput of `bat-jax prepare` on a folder of 10 s wav files, with 1 and 2 worker processes.

Run from the repository root: `python -m benchmarks.prepare [--clips 80] [--seconds 10] [--workers 1 2]`.
Writes synthetic 16-bit wav files to a temporary folder, then for each worker count:
  total   `bat-jax prepare --source folder` in a fresh Python process, as a user runs it; clips/s is the
          manifest's figure: the whole prepare call (listing, worker start-up and jit compilations,
          decoding, front-end, encoding, writing), without the interpreter start.
  steady  the same clip pipeline (each worker: decode, front-end, encode, write its shard) once the workers
          are started and compiled: best of `--repeats` passes over all the files, one shard per worker.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bat_jax.audio import synthetic
from bat_jax.data import prepare, shards, sources


def write_inputs(folder: Path, clips: int, seconds: float) -> None:
    config = synthetic.SyntheticConfig(num_clips=clips, min_seconds=seconds, max_seconds=seconds, seed=0)
    synthetic.write_folder(folder, config)


def run_prepare(inputs: Path, out: Path, workers: int, frontend: str) -> tuple[dict, float]:
    """(manifest timing, wall seconds) of one `bat-jax prepare` run in a fresh process."""
    command = [
        sys.executable,
        "-c",
        "import sys; from bat_jax.cli import main; sys.exit(main(sys.argv[1:]))",
        "prepare",
        "--source",
        "folder",
        "--input",
        str(inputs),
        "--labels-csv",
        str(inputs / "labels.csv"),
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--frontend",
        frontend,
        "--no-progress",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads((out / "manifest.json").read_text())["timing"], wall


def steady_rate(inputs: Path, out: Path, workers: int, frontend_name: str, repeats: int) -> float:
    """Best clips/s of the workers computing and writing shards (one per worker), after a warm-up that starts
    and compiles every worker."""
    plan = sources.folder_source(inputs, labels_csv=inputs / "labels.csv")
    split = plan.splits[0]
    frontend = prepare.Frontend.create(frontend_name)
    ranges = shards.plan_shards(len(split.tasks), num_shards=workers)
    (out / split.name).mkdir(parents=True, exist_ok=True)
    (out / shards.PROGRESS_DIR / split.name).mkdir(parents=True, exist_ok=True)

    def jobs(prefix: str, clips: int | None = None) -> list:
        return [
            prepare.ShardJob(
                split.name, k, f"{prefix}-{k}", tuple(split.tasks[i] for i in r[:clips]), "bench"
            )
            for k, r in enumerate(ranges)
        ]

    best = 0.0
    with prepare.Runner(workers, {split.name: split.loader}, frontend, len(plan.vocabulary)) as runner:
        assert all(state["num_records"] == 2 for _, state in runner.run(out, jobs("warm-up", 2)))
        for repeat in range(repeats):
            start = time.perf_counter()
            for _ in runner.run(out, jobs(f"timed{repeat}")):
                pass
            best = max(best, len(split.tasks) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=80, help="number of wav files")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each file")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time")
    parser.add_argument("--frontend", default="bat", choices=("bat", "kaldi"))
    parser.add_argument("--repeats", type=int, default=2, help="timed steady-state passes (best reported)")
    args = parser.parse_args()

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = platform.processor() or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    python = platform.python_version()
    print(f"machine: {machine}, {cpus} CPUs available (load average {load:.1f}), python {python}")
    print(f"input: {args.clips} wav files of {args.seconds} s (16 kHz, 16-bit), front-end {args.frontend}")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = Path(tmp) / "wav"
        start = time.perf_counter()
        write_inputs(inputs, args.clips, args.seconds)
        print(f"wrote the inputs in {time.perf_counter() - start:.1f} s")
        for workers in args.workers:
            timing, wall = run_prepare(inputs, Path(tmp) / f"out{workers}", workers, args.frontend)
            steady = steady_rate(inputs, Path(tmp) / f"steady{workers}", workers, args.frontend, args.repeats)
            rates[workers] = total, steady = timing["clips_per_second"], steady
            print(
                f"workers {workers}: total {total:.2f} clips/s (prepare {timing['seconds']:.1f} s, "
                f"wall incl. interpreter start {wall:.1f} s), steady {steady:.2f} clips/s"
            )
    if 1 in rates and 2 in rates:
        total, steady = (rates[2][i] / rates[1][i] for i in range(2))
        print(f"scaling 2 workers / 1 worker: total {total:.2f}x, steady {steady:.2f}x")


if __name__ == "__main__":
    main()
