"""`bat-jax launch tpu|slurm|local [launcher flags] --config FILE --workdir DIR [--config.a.b=v ...]`.

The `bat-jax pretrain` arguments (--config, --workdir, --no-progress, the --config.* overrides) go with
the launcher's flags; `--dry-run` prints the commands (a runnable shell script) and exits 0. Run the same
launch command again to resume after a preemption: it runs the same `bat-jax pretrain` command.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bat_jax.launch import commands as cmd

HELP = """\
Launch `bat-jax pretrain` on a TPU VM pod, a SLURM GPU cluster or this machine.

  tpu    every worker of an existing TPU VM, through `gcloud compute tpus tpu-vm ssh --worker=all`
         (JAX finds the workers itself); creates nothing; --mount-bucket first mounts a bucket with gcsfuse
  slurm  writes a batch script (one srun task per GPU, --requeue, SIGTERM before the time limit) and
         submits it with sbatch --dependency=singleton (one job of the run at a time)
  local  one process on all of this machine's devices

The workdir is a path every process shares (a gcsfuse mount, NFS, Lustre); gs:// paths are refused.
--dry-run prints the commands and runs nothing. The same command again resumes from the latest checkpoint.

example:
  bat-jax launch tpu --tpu my-v5p-64 --zone us-east5-a --mount-bucket my-bucket --dry-run \\
    --config configs/pretrain/bat_base.py --workdir /mnt/my-bucket/runs/bat_base \\
    --config.data.root=/mnt/my-bucket/data/as2m
"""


def _common(parser: argparse.ArgumentParser) -> None:
    job = parser.add_argument_group("the bat-jax pretrain command (also any --config.a.b=v override)")
    job.add_argument("--config", required=True, metavar="FILE", help="the config file, as bat-jax pretrain")
    job.add_argument("--workdir", required=True, metavar="DIR", help="the workdir, shared by every process")
    job.add_argument("--no-progress", action="store_true", help="no console progress bar (logs, batch jobs)")
    job.add_argument("--bat-jax", metavar="PATH", help="the bat-jax executable to run (default: bat-jax)")
    job.add_argument("--env", action="append", metavar="NAME=VALUE", help="set for the run (repeatable)")
    job.add_argument(
        "--compilation-cache", metavar="DIR", help="JAX_COMPILATION_CACHE_DIR (a shared folder; gs:// on TPU)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and run nothing")
    parser.set_defaults(func=run, config_overrides=True)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "launch",
        help="launch bat-jax pretrain on a TPU VM pod, a SLURM cluster or this machine",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="launcher", metavar="LAUNCHER", parser_class=type(parser))
    kinds.required = True

    tpu = kinds.add_parser("tpu", help="every worker of an existing TPU VM (gcloud ssh --worker=all)")
    tpu.add_argument("--tpu", required=True, metavar="NAME", help="the TPU VM's name")
    tpu.add_argument("--zone", required=True, help="its zone")
    tpu.add_argument("--project", help="its project (default: gcloud's)")
    tpu.add_argument("--worker", default="all", help="gcloud's --worker: all (default), 0, 1,4,6, 1-3")
    tpu.add_argument("--remote-dir", metavar="DIR", help="cd here on every worker first (e.g. the clone)")
    tpu.add_argument(
        "--mount-bucket", metavar="BUCKET", help="gcsfuse-mount this bucket on every worker first"
    )
    tpu.add_argument("--mount-point", metavar="DIR", help="where (default /mnt/BUCKET)")
    tpu.add_argument(
        "--gcloud-flag",
        action="append",
        default=[],
        metavar="FLAG",
        help="more, e.g. --gcloud-flag=--internal-ip",
    )
    _common(tpu)

    slurm = kinds.add_parser("slurm", help="a SLURM batch job, one srun task per GPU")
    slurm.add_argument("--nodes", type=int, required=True, metavar="N")
    slurm.add_argument(
        "--gpus-per-node", type=int, required=True, metavar="G", help="also the tasks per node"
    )
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--time", help="the time limit, e.g. 24:00:00")
    slurm.add_argument("--cpus-per-task", type=int, metavar="C", help="CPUs per process (data workers)")
    slurm.add_argument("--job-name", help="default bat-jax-<workdir's name>")
    slurm.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        metavar="S",
        help="SIGTERM S seconds before the limit (300)",
    )
    slurm.add_argument("--output", default="%x-%j.out", help="the job's log (sbatch --output; %%x-%%j.out)")
    slurm.add_argument("--chdir", metavar="DIR", help="cd here first (default: where sbatch runs)")
    slurm.add_argument("--script", metavar="FILE", help="the batch script to write (default JOBNAME.sbatch)")
    slurm.add_argument(
        "--sbatch-option",
        action="append",
        default=[],
        metavar="OPT",
        help="another #SBATCH line, e.g. --qos=high",
    )
    slurm.add_argument(
        "--repeat", type=int, default=1, metavar="K", help="submit K jobs, each after the last"
    )
    _common(slurm)

    local = kinds.add_parser("local", help="one process on all of this machine's devices")
    _common(local)
    return parser


def default_bat_jax(launcher: str) -> str:
    """`bat-jax` on the remote machines; locally the one beside this Python when there is one."""
    if launcher == "local":
        beside = Path(sys.executable).with_name("bat-jax")
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    return "bat-jax"


def plan_of(args: argparse.Namespace) -> cmd.Plan:
    """The launch plan of parsed arguments (LaunchError for bad ones)."""
    job = cmd.Pretrain(
        config=args.config,
        workdir=args.workdir,
        overrides=tuple(getattr(args, "overrides", ())),
        no_progress=args.no_progress,
        bat_jax=args.bat_jax or default_bat_jax(args.launcher),
        env=cmd.parse_env(args.env, args.compilation_cache),
    )
    if args.launcher == "tpu":
        tpu = cmd.Tpu(
            name=args.tpu,
            zone=args.zone,
            project=args.project,
            worker=args.worker,
            remote_dir=args.remote_dir,
            mount_bucket=args.mount_bucket,
            mount_point=args.mount_point,
            gcloud_flags=tuple(args.gcloud_flag),
        )
        return cmd.tpu_plan(tpu, job)
    if args.launcher == "slurm":
        slurm = cmd.Slurm(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            partition=args.partition,
            account=args.account,
            time=args.time,
            cpus_per_task=args.cpus_per_task,
            job_name=args.job_name,
            signal_seconds=args.signal_seconds,
            output=args.output,
            chdir=args.chdir,
            script=args.script,
            sbatch_options=tuple(args.sbatch_option),
            repeat=args.repeat,
        )
        return cmd.slurm_plan(slurm, job)
    return cmd.local_plan(job)


TOOLS = {
    "gcloud": "install the Google Cloud CLI (cloud.google.com/sdk) and `gcloud auth login`",
    "sbatch": "run it on a SLURM login node",
}


def _missing_tool(plan: cmd.Plan) -> str | None:
    for step in plan:
        if isinstance(step, cmd.Command) and shutil.which(step.argv[0]) is None:
            why = TOOLS.get(
                step.argv[0], "check the path (--bat-jax) or activate the environment that has it"
            )
            return f"{step.argv[0]} not found on PATH; {why}, or pass --dry-run to print the commands"
    return None


def run(args: argparse.Namespace) -> int:
    where = f"bat-jax launch {args.launcher}"
    try:
        plan = plan_of(args)
    except cmd.LaunchError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(cmd.render(plan))
        return 0
    missing = _missing_tool(plan)
    if missing:
        print(f"{where}: error: {missing}", file=sys.stderr)
        return 2
    if args.launcher == "local":  # this process becomes the run: SIGTERM and Ctrl-C reach it directly
        (step,) = plan
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(step.argv[0], list(step.argv), {**os.environ, **dict(step.env)})
    for i, step in enumerate(plan, 1):
        print(f"{where}: {i}. {step.label}", file=sys.stderr, flush=True)
        if isinstance(step, cmd.WriteFile):
            Path(step.path).parent.mkdir(parents=True, exist_ok=True)
            Path(step.path).write_text(step.text)
            continue
        rc = subprocess.run(list(step.argv), env={**os.environ, **dict(step.env)}).returncode
        if rc != 0:
            print(f"{where}: error: step {i} ({step.argv[0]}) exited with status {rc}", file=sys.stderr)
            return rc
    return 0


def main(argv: list[str] | None = None) -> int:
    """`bat-jax launch ...` without the other subcommands' parsers (`python -m bat_jax.launch`)."""
    from bat_jax.cli import Parser

    parser = Parser(prog="bat-jax")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", parser_class=Parser)
    sub.required = True
    add_parser(sub)
    args, extra = parser.parse_known_args(["launch", *(sys.argv[1:] if argv is None else argv)])
    args.overrides = extra
    return int(args.func(args) or 0)
