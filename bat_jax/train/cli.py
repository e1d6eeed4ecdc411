"""`bat-jax pretrain --config FILE --workdir DIR [--config.a.b=v ...]`: the pretraining job's command line.

Overrides follow `ml_collections.config_flags` (they are parsed by it): nested fields, the field's type
checked (`--config.train.steps=1.5` is refused), an unknown field is an error naming it.
"""

from __future__ import annotations

import argparse
import re
import sys

HELP = """\
Pretrain BAT with the config FILE (configs/pretrain/{bat_base,bat_small,eat_style,tiny}.py) in DIR.

config overrides, as ml_collections config flags (type-checked; an unknown field is an error):
  --config.data.root=PATH          a folder written by `bat-jax prepare` (its manifest's clip.frames must
                                   equal --config.frames)
  --config.data.split=NAME         the split to train on (default train)
  --config.data.worker_count=N     Grain worker processes (0: read in this process)
  --config.data.global_batch_size=N  clips per update over all devices (x ssl.num_views views)
  --config.train.steps=N           updates of the run (the lr schedule ends here)
  --config.train.checkpoint_every=N  save every N updates (and at the end, and on SIGTERM)
  --config.train.log_every=N       one metrics line every N updates
  --config.train.seed=N            the masks' and the initial weights' seed
  --config.train.keep=N / keep_every=K  keep the last N checkpoints plus every K-th step
  --config.train.init_from=PATH    start student and teacher encoders from a checkpoint (anything
                                   bat_jax.load_encoder reads); the decoder starts fresh, or from a
                                   workdir source's decoder of the same step when its shapes fit
  --config.train.peak_flops_per_device=F  one device's peak FLOP/s for the MFU (0: a vendor table for
                                   known TPUs/GPUs at bf16, else a matmul measured at the start)
  --config.mesh.shape.data=N / --config.mesh.shape.fsdp=N   the device mesh (-1: the rest)

the workdir DIR:
  config.json              the resolved config
  checkpoints/<step>/      Orbax checkpoints: state/ (step, params, teacher, opt_state, rng), data/ (Grain)
  metrics.jsonl            one JSON object per log line: step, loss, global_loss, local_loss, target_var,
                           pred_var, lr, ema_decay, grad_norm, clips_per_s, step_time_s, data_wait_s, mfu
  tb/                      TensorBoard events: tensorboard --logdir DIR/tb

resume and preemption:
  a run in a DIR that has a checkpoint resumes from the latest one (the same batches and masks follow);
  SIGTERM saves at the next step boundary and exits 0 with a message; a NaN/Inf loss stops the run (exit 1)
  naming the step and the last good checkpoint; a failed save stops it (exit 1) naming the cause and the
  latest complete checkpoint. A kill mid-save leaves the previous checkpoint the latest readable one.
  bat_jax.load_encoder(DIR) loads the latest student encoder.

several processes (hosts): one process per host (TPU VM worker) or per GPU, all with the same command;
  --coordinator-address HOST:PORT --num-processes N --process-id I   start jax.distributed with them (all
                                   three, I = 0..N-1; HOST:PORT is process 0's address and a free port)
  --local-device-ids 0,1           the devices this process uses (default: all it sees)
  without these flags the environment decides: an `srun` step of several SLURM tasks, several Open MPI
  ranks, a Cloud TPU VM or GKE TPU workers, or JAX_COORDINATOR_ADDRESS set, call jax.distributed.initialize()
  (JAX finds the rest); otherwise the run is one process. --single-process skips this detection.
  Each process reads its share of the data; process 0 alone writes config.json, metrics.jsonl, tb/ and the
  console; all write the checkpoint together; SIGTERM to any of them stops all after the same step, saved.
  The config needs a mesh section spanning every process's devices (mesh.shape over jax.device_count()).

host memory (Linux, glibc >= 2.35): the process re-executes itself once at start (same PID) with
  GLIBC_TUNABLES=glibc.malloc.hugetlb=1: XLA:CPU's per-step temporaries (gigabytes) then fault in 2 MiB
  huge pages instead of 4 KiB pages every step; BAT_JAX_HOST_MALLOC=system keeps glibc's defaults.

exit status: 0 done or saved after SIGTERM, 1 NaN/Inf loss or a failed save, 2 a config or flag error.

example:
  bat-jax prepare --source synthetic --out data/demo
  bat-jax pretrain --config configs/pretrain/tiny.py --workdir runs/tiny --config.train.steps=100
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain BAT (self-supervised) from prepared spectrogram shards",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="an ml_collections config file")
    parser.add_argument("--workdir", required=True, metavar="DIR", help="checkpoints, metrics, config.json")
    parser.add_argument("--no-progress", action="store_true", help="no console progress bar")
    multi = parser.add_argument_group("several processes (see above)")
    multi.add_argument(
        "--coordinator-address", metavar="HOST:PORT", help="process 0's address and a free port"
    )
    multi.add_argument("--num-processes", type=int, metavar="N", help="the processes of the run")
    multi.add_argument("--process-id", type=int, metavar="I", help="this process's number, 0..N-1")
    multi.add_argument("--local-device-ids", metavar="IDS", help="this process's devices, e.g. 0,1")
    multi.add_argument(
        "--single-process", action="store_true", help="never start jax.distributed, whatever the environment"
    )
    parser.set_defaults(func=run, config_overrides=True)
    return parser


def parse_config(path: str, overrides: list[str]):
    """The config of ``path`` with ``overrides`` (``--config.a.b=v``) applied by ml_collections' config flags;
    ValueError with one line naming the flag otherwise."""
    from absl import flags
    from ml_collections import config_flags

    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
        raise ValueError(f"{bad[0]}: expected config overrides of the form --config.FIELD=VALUE, found {bad}")
    argv = ["bat-jax pretrain", f"--config={path}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=values, sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (AttributeError, KeyError) as e:  # an unknown field: ml_collections says which, with a suggestion
        text = str(e).replace("\\n", "\n").replace("\\'", "'")
        names = re.findall(r"'(\w+)'", text)
        field = names[0] if names else text
        hint = re.search(r'Did you mean "(\w+)"', text)
        flag = next((o for o in overrides if re.search(rf"[.]{re.escape(field)}(=|[.]|$)", o)), None)
        flag = flag.split("=")[0] if flag else "--config"
        suggestion = f' (did you mean "{hint.group(1)}"?)' if hint else ""
        raise ValueError(f"{flag}: no config field {field!r} in {path}{suggestion}") from None
    except flags.Error as e:
        raise ValueError(f"{path}: {e}") from None


def distributed_options(args: argparse.Namespace):
    """The multi-process flags as `distributed.Options` (DistributedError for a bad --local-device-ids)."""
    from bat_jax.train import distributed

    ids = getattr(args, "local_device_ids", None)
    return distributed.Options(
        coordinator_address=getattr(args, "coordinator_address", None),
        num_processes=getattr(args, "num_processes", None),
        process_id=getattr(args, "process_id", None),
        local_device_ids=None if ids is None else distributed.parse_device_ids(ids),
        single_process=bool(getattr(args, "single_process", False)),
    )


def run(args: argparse.Namespace) -> int:
    from bat_jax.train import distributed

    try:  # before any other JAX call of the run (the config files import JAX but run nothing)
        distributed.initialize(distributed_options(args))
    except distributed.DistributedError as e:
        print(f"bat-jax pretrain: error: {e}", file=sys.stderr)
        return 2
    from bat_jax.train import pretrain

    try:
        cfg = parse_config(args.config, list(getattr(args, "overrides", [])))
    except (ValueError, FileNotFoundError) as e:
        print(f"bat-jax pretrain: error: {e}", file=sys.stderr)
        return 2
    try:
        return pretrain.run(cfg, args.workdir, progress=not args.no_progress)
    except pretrain.ConfigError as e:
        print(f"bat-jax pretrain: error: {e}", file=sys.stderr)
        return 2
