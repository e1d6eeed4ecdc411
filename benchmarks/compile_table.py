"""The compile-check table of issue 9 §1: BAT-B's pretraining step compiled for v5p slices and NVIDIA GPU
nodes on this machine (`bat_jax.train.compile_check`: libtpu's compile-only client, XLA:GPU's from JAX's CUDA
plugin), one JSON row per (topology, batch, FSDP, remat).

    python -m benchmarks.compile_table                          # the v5p rows of benchmarks/RESULTS.md
    python -m benchmarks.compile_table --rows gpu               # its GPU rows
    python -m benchmarks.compile_table --rows v5p:2x2x2,96,1,none v5p:4x4x4,768,8,full h100:4x8,384,1,none

A row is TOPOLOGY,GLOBAL_BATCH,FSDP,REMAT (REMAT: none or full). The paper's batch is 48 clips x 16 views per
4 GPUs; the global batch here scales it with the chips (12 per chip), and larger ones probe what fits.
"""

from __future__ import annotations

import argparse
import json
import os

ROWS = [
    "v5p:2x2x2,96,1,none",
    "v5p:2x2x2,96,8,none",
    "v5p:2x2x2,96,1,full",
    "v5p:2x2x2,384,1,none",
    "v5p:2x2x2,384,1,full",
    "v5p:2x2x2,768,1,full",
    "v5p:4x4x4,768,1,none",
    "v5p:4x4x4,768,8,full",
    "v5p:4x8x8,3072,1,none",
    "v5p:4x8x8,12288,1,full",
]
GPU_ROWS = [
    "h100:8,96,1,none",
    "h100:8,384,1,none",
    "h100:8,384,1,full",
    "h100:4x8,384,1,none",
    "a100:8,96,1,none",
    "h200:8,384,1,none",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/pretrain/bat_base.py")
    p.add_argument("--rows", nargs="*", default=ROWS, help="TOPOLOGY,GLOBAL_BATCH,FSDP,REMAT, or gpu")
    a = p.parse_args()
    a.rows = GPU_ROWS if a.rows == ["gpu"] else a.rows
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # before JAX starts: the chips are described, not used
    from bat_jax.train import compile_check as cc
    from bat_jax.train.config import load

    devices = {}
    for row in a.rows:
        topology, batch, fsdp, remat = row.split(",")
        cfg = load(a.config)
        cfg.data.global_batch_size = int(batch)
        cfg.mesh.shape.fsdp = int(fsdp)
        cfg.encoder.overrides.remat_policy = remat
        if topology not in devices:
            devices[topology] = cc.topology_devices(topology)
        try:
            report = cc.compile_check(cfg, topology, devices[topology])
            print(json.dumps(report.row()), flush=True)
        except Exception as e:  # noqa: BLE001 - a row that cannot compile is a row of the table too
            print(json.dumps({"row": row, "error": f"{type(e).__name__}: {e}"[:500]}), flush=True)


if __name__ == "__main__":
    main()
