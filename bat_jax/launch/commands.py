"""The launchers' command lines, as pure functions of their inputs (nothing here runs anything).

A launch is a `Plan`: a list of steps, each a `Command` (an argv, run without a shell, plus the environment
it adds) or a `WriteFile` (the SLURM batch script). `render(plan)` is the plan as a shell script, one
labelled step after another: what ``--dry-run`` prints, and runnable as it is.

    job = Pretrain(config="configs/pretrain/bat_base.py", workdir="/mnt/runs/b", overrides=("--config.x=1",))
    tpu_plan(Tpu(name="pod", zone="us-east5-a"), job)  # gcloud ... ssh pod --worker=all --command ...
    slurm_plan(Slurm(nodes=4, gpus_per_node=8), job)   # the batch script, then sbatch
    local_plan(job)                                    # bat-jax pretrain ... --single-process

Multi-process runs start no distributed runtime by flags: JAX finds the other processes itself, on every
worker of a TPU VM, and in an `srun` step of one task per GPU (bat_jax/train/distributed.py).
"""

from __future__ import annotations

import dataclasses
import re
import shlex

HEREDOC = "BAT_JAX_SBATCH"  # the delimiter of the batch script in the rendered plan


class LaunchError(ValueError):
    """Launcher arguments that cannot make a run; the message names the flag, what it expected and found."""


@dataclasses.dataclass(frozen=True)
class Pretrain:
    """The `bat-jax pretrain` command every process runs: the same on every host and on every rerun."""

    config: str
    workdir: str
    overrides: tuple[str, ...] = ()  # --config.a.b=v, in order
    no_progress: bool = False
    bat_jax: str = "bat-jax"  # the executable on the machines that run it
    env: tuple[tuple[str, str], ...] = ()  # (NAME, value) set for the run, in order

    def argv(self, *extra: str) -> list[str]:
        argv = [self.bat_jax, "pretrain", "--config", self.config, "--workdir", self.workdir]
        return argv + (["--no-progress"] if self.no_progress else []) + list(self.overrides) + list(extra)


@dataclasses.dataclass(frozen=True)
class Command:
    label: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()  # added to the launcher's environment

    def shell(self) -> str:
        return " ".join([*env_words(self.env), shlex.join(self.argv)])


@dataclasses.dataclass(frozen=True)
class WriteFile:
    label: str
    path: str
    text: str

    def shell(self) -> str:
        return f"cat > {shlex.quote(self.path)} <<'{HEREDOC}'\n{self.text}{HEREDOC}"


Plan = list[Command | WriteFile]


def render(plan: Plan) -> str:
    """The plan as a shell script: ``# i. label`` then the step, for each step."""
    return "".join(f"# {i}. {step.label}\n{step.shell()}\n" for i, step in enumerate(plan, 1))


def env_words(env) -> list[str]:
    return [f"{name}={shlex.quote(value)}" for name, value in env]


# --- checks shared by the launchers -------------------------------------------------------------------


def parse_env(items: list[str] | None, compilation_cache: str | None = None) -> tuple[tuple[str, str], ...]:
    """``--env NAME=VALUE`` items (and ``--compilation-cache DIR`` as JAX_COMPILATION_CACHE_DIR) in order."""
    env = []
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise LaunchError(f"--env: expected NAME=VALUE with NAME a shell variable name, found {item!r}")
        env.append((name, value))
    if compilation_cache:
        if any(name == "JAX_COMPILATION_CACHE_DIR" for name, _ in env):
            raise LaunchError(
                "--compilation-cache: expected it or --env JAX_COMPILATION_CACHE_DIR=, found both"
            )
        env.append(("JAX_COMPILATION_CACHE_DIR", compilation_cache))
    return tuple(env)


def check_pretrain(job: Pretrain) -> None:
    """What every launcher refuses: arguments other than --config.FIELD=VALUE overrides (the launchers pass no
    multi-process flags: JAX detects the processes), and gs:// paths, which bat-jax pretrain does not open
    (it reads and writes through the local filesystem: mount the bucket with gcsfuse)."""
    named = [("--config", job.config), ("--workdir", job.workdir), ("--bat-jax", job.bat_jax)]
    named += [(o.split("=", 1)[0], o) for o in job.overrides] + [("--env", f"{k}={v}") for k, v in job.env]
    for flag, value in named:
        if "\n" in value or "\r" in value:
            raise LaunchError(f"{flag}: expected a value on one line, found {value!r}")
    for item in job.overrides:
        if not re.fullmatch(r"--config\.[A-Za-z_][\w.]*=.*", item):
            raise LaunchError(
                f"{item}: expected launcher flags (--help) or config overrides of the form "
                "--config.FIELD=VALUE (with '='); multi-process flags are left to JAX's detection"
            )
    paths = {"--workdir": job.workdir, "--config": job.config}
    paths |= {o.split("=", 1)[0]: o.split("=", 1)[1] for o in job.overrides if o.startswith("--config.data.")}
    for flag, path in paths.items():
        if re.match(r"^[a-z][a-z0-9+.-]*://", path):
            raise LaunchError(
                f"{flag}: expected a path on a filesystem (bat-jax pretrain reads and writes files through "
                f"it; mount a bucket with gcsfuse, e.g. the TPU launcher's --mount-bucket), found {path!r}"
            )


def _plain(flag: str, value: str) -> str:
    """A value written into an #SBATCH line or a gcloud flag: no whitespace, not empty."""
    if not value or re.search(r"\s", value):
        raise LaunchError(f"{flag}: expected a value without spaces, found {value!r}")
    return value


# --- TPU VM pod -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tpu:
    """An existing TPU VM (the launcher creates nothing) and how to reach its workers."""

    name: str
    zone: str
    project: str | None = None
    worker: str = "all"  # gcloud's --worker: all, 0, 1,4,6 or 1-3
    remote_dir: str | None = None  # cd here on every worker first (relative paths resolve from it)
    mount_bucket: str | None = None  # gcsfuse-mount this bucket first, on every worker
    mount_point: str | None = None
    gcloud_flags: tuple[str, ...] = ()  # more gcloud flags, e.g. --internal-ip


def mount_point_of(tpu: Tpu) -> str | None:
    if tpu.mount_bucket is None:
        return None
    return tpu.mount_point or f"/mnt/{bucket_name(tpu.mount_bucket)}"


def bucket_name(bucket: str) -> str:
    name = bucket.removeprefix("gs://").rstrip("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]", name):
        raise LaunchError(
            f"--mount-bucket: expected a bucket name such as my-bucket or gs://my-bucket, found {bucket!r}"
        )
    return name


def mount_command(tpu: Tpu) -> str:
    """The remote shell command that mounts the bucket (skipped where it is mounted already; creates the mount
    point if missing, owned by the user). --implicit-dirs shows folders uploaded by other tools;
    --rename-dir-limit lets Orbax rename a finished checkpoint folder into place on a flat bucket."""
    point = shlex.quote(mount_point_of(tpu))
    bucket = shlex.quote(bucket_name(tpu.mount_bucket))
    return (
        f"if ! mountpoint -q {point}; then "
        f'sudo mkdir -p {point} && sudo chown "$(id -u):$(id -g)" {point} && '
        f"gcsfuse --implicit-dirs --rename-dir-limit=100000 {bucket} {point}; fi"
    )


def remote_pretrain_command(tpu: Tpu, job: Pretrain) -> str:
    """The shell command each worker runs: [cd DIR &&] [NAME=VALUE ...] bat-jax pretrain ..."""
    words = [*env_words(job.env), shlex.join(job.argv())]
    cd = f"cd {shlex.quote(tpu.remote_dir)} && " if tpu.remote_dir else ""
    return cd + " ".join(words)


def gcloud_ssh(tpu: Tpu, remote: str) -> tuple[str, ...]:
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", _plain("--tpu", tpu.name), f"--zone={tpu.zone}"]
    if tpu.project:
        argv.append(f"--project={tpu.project}")
    argv += [f"--worker={tpu.worker}", *tpu.gcloud_flags, "--command", remote]
    return tuple(argv)


def check_tpu(tpu: Tpu, job: Pretrain) -> None:
    check_pretrain(job)
    _plain("--zone", tpu.zone)
    if tpu.project is not None:
        _plain("--project", tpu.project)
    if not re.fullmatch(r"all|\d+(-\d+)?(,\d+(-\d+)?)*", tpu.worker):
        raise LaunchError(
            f"--worker: expected all, a worker number, a list 1,4,6 or a range 1-3, found {tpu.worker!r}"
        )
    if not job.workdir.startswith("/"):
        raise LaunchError(
            f"--workdir: expected an absolute path on a filesystem every worker shares (a gcsfuse mount or a "
            f"shared disk), found {job.workdir!r} (a relative path is on each worker's own disk)"
        )
    if tpu.mount_point is not None and tpu.mount_bucket is None:
        raise LaunchError("--mount-point: expected it with --mount-bucket BUCKET, found no --mount-bucket")
    if tpu.mount_bucket is not None:
        bucket_name(tpu.mount_bucket)
        if not mount_point_of(tpu).startswith("/"):
            raise LaunchError(f"--mount-point: expected an absolute path, found {tpu.mount_point!r}")


def tpu_plan(tpu: Tpu, job: Pretrain) -> Plan:
    """[the gcsfuse mount on every worker,] then `bat-jax pretrain` on every worker, through gcloud ssh."""
    check_tpu(tpu, job)
    plan: Plan = []
    if tpu.mount_bucket is not None:
        where = f"gs://{bucket_name(tpu.mount_bucket)} at {mount_point_of(tpu)}"
        label = f"mount {where} on the workers (gcsfuse; skipped where mounted already)"
        plan.append(Command(label, gcloud_ssh(tpu, mount_command(tpu))))
    label = f"bat-jax pretrain on the workers ({tpu.worker}) of TPU {tpu.name}; JAX finds the others itself"
    plan.append(Command(label, gcloud_ssh(tpu, remote_pretrain_command(tpu, job))))
    return plan


# --- SLURM ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Slurm:
    """A batch job of `nodes` nodes, one `bat-jax pretrain` process (srun task) per GPU."""

    nodes: int
    gpus_per_node: int
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # sbatch --time, e.g. 24:00:00 or 2-00:00:00
    cpus_per_task: int | None = None
    job_name: str | None = None  # default: bat-jax-<workdir's name>
    signal_seconds: int = 300  # SIGTERM to every task this long before the time limit (the run saves)
    output: str = "%x-%j.out"
    chdir: str | None = None  # cd here first (default: where sbatch was run)
    script: str | None = None  # the batch script's file (default: <job name>.sbatch)
    sbatch_options: tuple[str, ...] = ()  # more #SBATCH lines, e.g. --qos=high
    repeat: int = 1  # submissions of the same script, each after the previous (singleton)


def job_name_of(slurm: Slurm, job: Pretrain) -> str:
    if slurm.job_name:
        return slurm.job_name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", job.workdir.rstrip("/").rsplit("/", 1)[-1]).strip("-")
    return f"bat-jax-{stem or 'run'}"


def script_path_of(slurm: Slurm, job: Pretrain) -> str:
    return slurm.script or f"{job_name_of(slurm, job)}.sbatch"


def check_slurm(slurm: Slurm, job: Pretrain) -> None:
    check_pretrain(job)
    for flag, value, low in (
        ("--nodes", slurm.nodes, 1),
        ("--gpus-per-node", slurm.gpus_per_node, 1),
        ("--cpus-per-task", slurm.cpus_per_task, 1),
        ("--signal-seconds", slurm.signal_seconds, 0),
        ("--repeat", slurm.repeat, 1),
    ):
        if value is not None and value < low:
            raise LaunchError(f"{flag}: expected an integer >= {low}, found {value}")
    for flag, value in (
        ("--partition", slurm.partition),
        ("--account", slurm.account),
        ("--time", slurm.time),
        ("--job-name", job_name_of(slurm, job)),
        ("--output", slurm.output),
    ):
        if value is not None:
            _plain(flag, value)
    for option in slurm.sbatch_options:
        if not option.startswith("-") or "\n" in option:
            raise LaunchError(
                f"--sbatch-option: expected an sbatch option such as --qos=high, found {option!r}"
            )
        if re.match(r"--(gpus-per-task|ntasks-per-gpu)\b", option):
            raise LaunchError(
                f"--sbatch-option: expected no {option.split('=')[0]}: JAX's SLURM detection needs every "
                "task to see all of its node's GPUs (jax #28194); the script asks for one task per GPU"
            )


def slurm_script(slurm: Slurm, job: Pretrain) -> str:
    """The batch script: one srun task per GPU, each seeing all of its node's GPUs (JAX picks the one of its
    SLURM_LOCALID); SIGTERM to the tasks before the time limit (the run saves and exits 0); requeued after
    a preemption or a node failure; the log appended to across requeues."""
    check_slurm(slurm, job)
    directives = [
        f"--job-name={job_name_of(slurm, job)}",
        f"--nodes={slurm.nodes}",
        f"--ntasks-per-node={slurm.gpus_per_node}",
        f"--gres=gpu:{slurm.gpus_per_node}",
    ]
    if slurm.cpus_per_task:
        directives.append(f"--cpus-per-task={slurm.cpus_per_task}")
    for flag, value in (("partition", slurm.partition), ("account", slurm.account), ("time", slurm.time)):
        if value:
            directives.append(f"--{flag}={value}")
    directives += [
        f"--signal=TERM@{slurm.signal_seconds}",
        "--requeue",
        "--open-mode=append",
        f"--output={slurm.output}",
        *slurm.sbatch_options,
    ]
    lines = [
        "#!/bin/bash",
        "# bat-jax pretrain, one process per GPU (written by `bat-jax launch slurm`). Submitting this",
        "# file again resumes the run from its workdir's latest checkpoint. Before the time limit",
        "# (--signal) and on a preemption SLURM sends SIGTERM to every task: the run saves at the next",
        "# step and exits 0.",
        *(f"#SBATCH {d}" for d in directives),
        "set -eu",
    ]
    if slurm.chdir:
        lines.append(f"cd {shlex.quote(slurm.chdir)}")
    lines += [f"export {word}" for word in env_words(job.env)]
    # one task per GPU and no --gpus-per-task: JAX's SLURM detection (jax #28194); --cpus-per-task again on
    # srun, which some SLURM versions do not take from the job
    cpus = [f"--cpus-per-task={slurm.cpus_per_task}"] if slurm.cpus_per_task else []
    lines.append(shlex.join(["srun", "--kill-on-bad-exit=1", *cpus, *job.argv()]))
    return "\n".join(lines) + "\n"


def slurm_plan(slurm: Slurm, job: Pretrain) -> Plan:
    """Write the batch script, then submit it (`repeat` times); --dependency=singleton runs one job of this
    name at a time, so a run never overlaps itself and each later job resumes where the previous one ended."""
    path = script_path_of(slurm, job)
    plan: Plan = [WriteFile(f"write the batch script {path}", path, slurm_script(slurm, job))]
    for i in range(slurm.repeat):
        label = (
            f"submit it (job {i + 1} of {slurm.repeat}; one job named {job_name_of(slurm, job)} at a time)"
        )
        plan.append(Command(label, ("sbatch", "--dependency=singleton", path)))
    return plan


# --- one machine ----------------------------------------------------------------------------------------


def local_plan(job: Pretrain) -> Plan:
    """`bat-jax pretrain` as one process on all of this machine's devices (--single-process: nothing to
    initialise, whatever the environment says)."""
    check_pretrain(job)
    return [
        Command("bat-jax pretrain on this machine's devices", tuple(job.argv("--single-process")), job.env)
    ]
