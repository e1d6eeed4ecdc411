"""`bat-jax prepare` scaling with worker processes: clips/s and where the CPU goes (main process vs workers).

    python -m benchmarks.prepare_scaling [--clips 300] [--workers 1 2] [--rounds 3] [--clips-per-shard 16]

Each worker process computes and writes whole shards; the main process only plans, hands out shards and
collects their .done.json states. Per round, the worker counts run alternated (1, 2, then 2, 1, ...), each in
two ways on `--source synthetic` clips (1-10 s, the default lengths):

  total   `bat-jax prepare --source synthetic` in a fresh Python process, as a user runs it: clips/s from the
          manifest (the whole prepare call: planning, worker start-up and jit compilation, clips, writing,
          sha256, manifest), and the CPU seconds of the main process during that call
          (resource.getrusage(RUSAGE_SELF)) against its worker processes' (RUSAGE_CHILDREN, once reaped).
  steady  the same shards written by a started, compiled Runner (bat_jax.data.prepare.Runner) in this
          process: clips/s, and the main process's CPU seconds (getrusage) against the workers'
          (psutil, per worker process) during the timed pass.

"main CPU share" = main CPU / (main + workers' CPU). With one worker everything runs in the main process.
With N workers the main process saturates one core at (clips / main CPU seconds) clips/s: the printed
"main ceiling", the point where it would become the bottleneck again. Shard bytes per clip are printed too,
so the write bandwidth any clips/s needs can be read off (the other limit of many workers on one disk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before jax is imported (steady runs in this process)

DRIVER = textwrap.dedent(
    """
    import json, resource, sys, time
    from bat_jax.cli import main
    import jax  # imported before the clock starts, as the command's import time is not prepare's
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    status = main(sys.argv[1:])
    wall = time.perf_counter() - t0
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    main_cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    import bat_jax
    print(json.dumps({"status": status, "wall": wall, "main_cpu": main_cpu, "bat_jax": bat_jax.__file__,
                      "children_cpu": c1.ru_utime + c1.ru_stime, "children_maxrss_kb": c1.ru_maxrss}))
    """
)


def synthetic_args(args: argparse.Namespace) -> list[str]:
    return [
        "--source", "synthetic", "--num-clips", str(args.clips), "--num-eval-clips", "0",
        "--clips-per-shard", str(args.clips_per_shard), "--no-progress",
    ]  # fmt: skip


def run_total(args: argparse.Namespace, out: Path, workers: int) -> dict:
    """One `bat-jax prepare` in a fresh process: manifest clips/s, wall, main vs workers' CPU seconds."""
    command = [sys.executable, "-c", DRIVER, "prepare", *synthetic_args(args), "--out", str(out)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the front-end runs on the CPU anyway; no accelerator probe
    if args.pythonpath:  # another checkout of bat-jax (e.g. a worktree of an older commit), total only
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(
        [*command, "--workers", str(workers)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=args.pythonpath,  # `python -c` puts the working folder first on sys.path
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    report["clips_per_second"] = manifest["timing"]["clips_per_second"]
    report["clips"] = manifest["splits"]["train"]["num_clips"]
    report["bytes"] = manifest["splits"]["train"]["bytes"]
    return report


def _cpu_seconds(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def run_steady(args: argparse.Namespace, out: Path, workers: int) -> dict:
    """The shards written by a started, warmed-up Runner: clips/s, main vs workers' CPU seconds."""
    import psutil

    from bat_jax.data import prepare, shards, sources

    plan = sources.synthetic_source(num_clips=args.clips, num_eval_clips=0)
    split = plan.splits[0]
    frontend = prepare.Frontend.create("bat")
    ranges = shards.plan_shards(len(split.tasks), clips_per_shard=args.clips_per_shard)
    (out / "train").mkdir(parents=True, exist_ok=True)
    (out / shards.PROGRESS_DIR / "train").mkdir(parents=True, exist_ok=True)

    def jobs(prefix: str, count: int | None = None) -> list:
        chosen = ranges if count is None else ranges[:count]
        return [
            prepare.ShardJob("train", k, f"{prefix}-{k:05d}", tuple(split.tasks[i] for i in r), "bench")
            for k, r in enumerate(chosen)
        ]

    with prepare.Runner(workers, {"train": split.loader}, frontend, len(plan.vocabulary)) as runner:
        # starts every worker and compiles most length buckets (1-10 s clips: 8 buckets of 128 frames)
        for _ in runner.run(out, jobs("warmup", 3 * workers)):
            pass
        pool = getattr(runner, "_pool", None)
        children = [psutil.Process(p) for p in (pool._processes if pool is not None else {})]
        before_children = sum(_cpu_seconds(c) for c in children)
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        for _ in runner.run(out, jobs("timed")):
            pass
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        children_cpu = sum(_cpu_seconds(c) for c in children) - before_children
    main_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"clips_per_second": len(split.tasks) / wall, "wall": wall, "main_cpu": main_cpu,
            "children_cpu": children_cpu, "clips": len(split.tasks)}  # fmt: skip


def share(report: dict) -> float:
    total = report["main_cpu"] + report["children_cpu"]
    return report["main_cpu"] / total if total > 0 else float("nan")


def describe(kind: str, workers: int, report: dict) -> str:
    ceiling = report["clips"] / report["main_cpu"] if report["main_cpu"] > 0 else float("inf")
    rate = f"{report['clips_per_second']:7.2f} clips/s"
    return (
        f"  {kind:<6} workers {workers}: {rate}  wall {report['wall']:6.1f} s"
        f"  CPU main {report['main_cpu']:6.2f} s / workers {report['children_cpu']:6.2f} s"
        f"  (main share {100 * share(report):5.1f} %, main ceiling {ceiling:8.0f} clips/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=300, help="synthetic clips (1-10 s each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts, alternated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clips-per-shard", type=int, default=16)
    parser.add_argument("--skip", choices=("total", "steady"), help="leave one of the two measurements out")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement to FILE")
    parser.add_argument(
        "--pythonpath",
        metavar="DIR",
        help="`total` with the bat_jax of another checkout (use --skip steady)",
    )
    args = parser.parse_args()

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.processor() or platform.machine()}, {cpus} CPUs (load average {load:.1f}), "
        f"python {platform.python_version()}; {args.clips} synthetic clips, {args.clips_per_shard} per shard"
    )
    results: dict[str, dict[int, list[dict]]] = {"total": {}, "steady": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = args.workers if round_index % 2 == 0 else list(reversed(args.workers))
            print(f"round {round_index + 1} (load average {os.getloadavg()[0]:.1f})")
            for workers in order:
                for kind, measure in (("total", run_total), ("steady", run_steady)):
                    if args.skip == kind:
                        continue
                    out = Path(tmp) / f"{kind}-{workers}-{round_index}"
                    report = measure(args, out, workers)
                    if "bat_jax" in report and not any(results["total"].values()):
                        print(f"  (total runs import {report['bat_jax']})")
                    results[kind].setdefault(workers, []).append(report)
                    print(describe(kind, workers, report), flush=True)
    print("median over rounds:")
    for kind, by_workers in results.items():
        medians = {w: statistics.median(r["clips_per_second"] for r in rs) for w, rs in by_workers.items()}
        shares = {w: statistics.median(share(r) for r in rs) for w, rs in by_workers.items()}
        for w in sorted(medians):
            print(
                f"  {kind:<6} workers {w}: {medians[w]:7.2f} clips/s, main CPU share {100 * shares[w]:5.1f} %"
            )
        if 1 in medians and len(medians) > 1:
            most = max(medians)
            print(f"  {kind:<6} scaling {most} workers / 1: {medians[most] / medians[1]:.2f}x")
    total = results["total"].get(max(args.workers)) or []
    if total and total[0].get("bytes"):
        print(f"shard bytes per clip: {total[0]['bytes'] / total[0]['clips']:.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
