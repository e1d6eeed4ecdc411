"""`bat-jax compile-check --config FILE --topology v5p:4x4x4|h100:4x8 [--config.a.b=v ...]`: the pretraining
step compiled ahead of time for a TPU slice or NVIDIA GPUs, on this machine (see
bat_jax/train/compile_check.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

HELP = """\
Compile the sharded pretraining step of the config FILE for a TPU topology or NVIDIA GPUs, on this machine
(no TPU or GPU needed: libtpu's compile-only client, `pip install 'bat-jax[tpu]'`, or XLA:GPU's from JAX's
CUDA plugin, `pip install 'bat-jax[gpu-compile]'`), and print, per topology:
  the mesh and the clips per chip it used, XLA's memory per chip (arguments = state + batch, outputs,
  temporaries, aliased = the donated state, code; their total against the chip's HBM), the FLOPs of one
  step (XLA's per chip, the model's for the global batch) and the compile time.

  --topology GEN:AxBxC   a TPU slice: v5p:2x2x1 (4 chips), v5p:2x2x2 (8), v5p:4x4x4 (64), v5p:4x8x8 (256),
                         v5e:4x4, v4:2x2x2, v6e:4x4 ...; repeat it to check several
  --topology GPU:[Nx]G   NVIDIA GPUs, G per node on N nodes (one process per GPU): h100:8, h100:4x8,
                         h200:8, a100:2x8 (H100 SXM 80 GB, H200 141 GB, A100 SXM4 80 GB). XLA:GPU picks
                         cuBLAS for the matmuls here (Triton's tiles need the card to autotune on)
  --config.a.b=v         the pretraining config's fields, as for `bat-jax pretrain` (the same step):
                         data.global_batch_size (the paper: 48 per 4 chips), mesh.shape.fsdp,
                         train.micro_batches, encoder.overrides.remat_policy=full, ...
  --json                 one JSON object per topology instead of the text

exit status: 0 every topology fits, 1 one does not (a sentence names the chip, the memory needed, the excess
and the settings to try), 2 a config, flag or topology error.

examples:
  bat-jax compile-check --config configs/pretrain/bat_base.py --topology v5p:4x4x4 \\
      --config.data.global_batch_size=768
  bat-jax compile-check --config configs/pretrain/bat_base.py --topology v5p:4x8x8 \\
      --config.data.global_batch_size=3072 --config.mesh.shape.fsdp=8 \\
      --config.encoder.overrides.remat_policy=full
  bat-jax compile-check --config configs/pretrain/bat_base.py --topology h100:4x8 \\
      --config.data.global_batch_size=384
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compile-check",
        help="compile the pretraining step for a TPU topology or GPUs here and print its memory per chip",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="a pretraining config file")
    parser.add_argument(
        "--topology",
        required=True,
        action="append",
        metavar="GEN:AxBxC|GPU:NxG",
        help="a TPU slice or GPUs (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per topology")
    parser.set_defaults(func=run, config_overrides=True)
    return parser


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu writes warnings about the TPU host it is not on (accelerator type, worker hostnames) straight
    to file descriptor 2 when its client starts; they do not apply to compiling only."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def run(args: argparse.Namespace) -> int:
    import jax

    # The host backend: the chips are described, not used. `bat-jax` sets it before JAX starts; called as
    # `bat_jax.cli.main([...])` JAX may have read the environment already, so its config is set too (before
    # JAX registers the CUDA plugin, which registers its compile-only client only when CUDA is not asked for).
    jax.config.update("jax_platforms", os.environ.setdefault("JAX_PLATFORMS", "cpu"))
    # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) meant for real TPU hosts; compiling only,
    # several processes (two compile-checks, parallel tests) may load it side by side.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from bat_jax.train import compile_check as cc
    from bat_jax.train.cli import parse_config

    say_error = lambda msg: print(f"bat-jax compile-check: error: {msg}", file=sys.stderr)  # noqa: E731
    try:
        cfg = parse_config(args.config, list(getattr(args, "overrides", [])))
    except (ValueError, FileNotFoundError) as e:
        say_error(e)
        return 2
    status = 0
    for topology in args.topology:
        try:
            with _quiet_stderr():
                devices = cc.topology_devices(topology)
            report = cc.compile_check(cfg, topology, devices)
        except cc.CompileCheckError as e:
            say_error(e)
            return 2
        print(json.dumps(report.row()) if args.json else cc.format_report(report), flush=True)
        try:
            cc.check_fits(report)
        except cc.DoesNotFit as e:
            print(f"bat-jax compile-check: {e}", file=sys.stderr)
            status = 1
    return status
