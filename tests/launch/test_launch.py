"""The launchers (bat_jax/launch, launch/*.sh): their exact commands, quoting, refusals, --dry-run, the tools
they run (fakes of gcloud and sbatch on PATH), the README's examples, and one real local pretraining run."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bat_jax.launch import cli
from bat_jax.launch import commands as cmd
from tests.train.conftest import STEPS, overrides

REPO = Path(__file__).resolve().parents[2]
BASE = "configs/pretrain/bat_base.py"
TINY = str(REPO / "configs" / "pretrain" / "tiny.py")


def launch(argv, capsys):
    """`bat-jax launch ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def job(**kw) -> cmd.Pretrain:
    base = dict(
        config=BASE,
        workdir="/mnt/b/runs/bat_base",
        overrides=("--config.data.root=/mnt/b/data/as2m", "--config.data.global_batch_size=384"),
        bat_jax=".venv/bin/bat-jax",
        env=(("JAX_COMPILATION_CACHE_DIR", "gs://b/jax-cache"),),
    )
    return cmd.Pretrain(**{**base, **kw})


POD = cmd.Tpu(name="my-pod", zone="us-east5-a", project="my-proj", remote_dir="bat-jax")
REMOTE = (
    "cd bat-jax && JAX_COMPILATION_CACHE_DIR=gs://b/jax-cache .venv/bin/bat-jax pretrain --config "
    "configs/pretrain/bat_base.py --workdir /mnt/b/runs/bat_base --config.data.root=/mnt/b/data/as2m "
    "--config.data.global_batch_size=384"
)
SSH = ("gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-east5-a", "--project=my-proj")
MOUNT = (
    "if ! mountpoint -q /mnt/my-bucket; then sudo mkdir -p /mnt/my-bucket && "
    'sudo chown "$(id -u):$(id -g)" /mnt/my-bucket && '
    "gcsfuse --implicit-dirs --rename-dir-limit=100000 my-bucket /mnt/my-bucket; fi"
)


# --- TPU VM pod -----------------------------------------------------------------------------------------


def test_tpu_runs_the_same_pretrain_command_on_every_worker():
    (step,) = cmd.tpu_plan(POD, job())
    assert step.argv == (*SSH, "--worker=all", "--command", REMOTE)
    assert step.env == ()
    assert cmd.render([step]) == (
        "# 1. bat-jax pretrain on the workers (all) of TPU my-pod; JAX finds the others itself\n"
        "gcloud compute tpus tpu-vm ssh my-pod --zone=us-east5-a --project=my-proj --worker=all --command "
        f"'{REMOTE}'\n"
    )
    # no distributed flags: JAX detects the workers on a TPU VM
    assert not {"--coordinator-address", "--num-processes", "--process-id"} & set(shlex.split(REMOTE))


def test_tpu_without_project_remote_dir_or_cache_and_with_worker_selection_and_gcloud_flags():
    tpu = cmd.Tpu(name="p", zone="z", worker="0-3", gcloud_flags=("--internal-ip",))
    (step,) = cmd.tpu_plan(tpu, job(env=(), bat_jax="bat-jax", overrides=()))
    remote = "bat-jax pretrain --config configs/pretrain/bat_base.py --workdir /mnt/b/runs/bat_base"
    assert step.argv == ("gcloud", "compute", "tpus", "tpu-vm", "ssh", "p", "--zone=z", "--worker=0-3",
                         "--internal-ip", "--command", remote)  # fmt: skip


def test_tpu_mount_is_a_separate_labelled_first_step_only_when_a_bucket_is_given():
    assert "gcsfuse" not in cmd.render(cmd.tpu_plan(POD, job()))
    tpu = cmd.Tpu(**{**POD.__dict__, "mount_bucket": "gs://my-bucket"})
    mount, run = cmd.tpu_plan(tpu, job())
    assert mount.label == (
        "mount gs://my-bucket at /mnt/my-bucket on the workers (gcsfuse; skipped where mounted already)"
    )
    assert mount.argv == (*SSH, "--worker=all", "--command", MOUNT)
    assert run.argv == (*SSH, "--worker=all", "--command", REMOTE)
    text = cmd.render([mount, run])
    assert (
        text.startswith("# 1. mount gs://my-bucket at /mnt/my-bucket")
        and "\n# 2. bat-jax pretrain on the workers" in text
    )
    elsewhere = cmd.Tpu(name="p", zone="z", mount_bucket="my-bucket", mount_point="/data/my b")
    (first, _) = cmd.tpu_plan(elsewhere, job())
    assert "gcsfuse --implicit-dirs --rename-dir-limit=100000 my-bucket '/data/my b'" in first.argv[-1]


# --- SLURM ----------------------------------------------------------------------------------------------

CLUSTER = cmd.Slurm(
    nodes=4, gpus_per_node=8, partition="gpu", account="proj", time="24:00:00", cpus_per_task=12
)
SCRIPT = """\
#!/bin/bash
# bat-jax pretrain, one process per GPU (written by `bat-jax launch slurm`). Submitting this
# file again resumes the run from its workdir's latest checkpoint. Before the time limit
# (--signal) and on a preemption SLURM sends SIGTERM to every task: the run saves at the next
# step and exits 0.
#SBATCH --job-name=bat-jax-bat_base
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=12
#SBATCH --partition=gpu
#SBATCH --account=proj
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -eu
export JAX_COMPILATION_CACHE_DIR=/shared/jax-cache
srun --kill-on-bad-exit=1 --cpus-per-task=12 bat-jax pretrain --config configs/pretrain/bat_base.py \
--workdir /shared/runs/bat_base --no-progress --config.data.root=/shared/data/as2m
"""


def slurm_job(**kw):
    base = dict(
        workdir="/shared/runs/bat_base",
        overrides=("--config.data.root=/shared/data/as2m",),
        no_progress=True,
        bat_jax="bat-jax",
        env=(("JAX_COMPILATION_CACHE_DIR", "/shared/jax-cache"),),
    )
    return job(**{**base, **kw})


def test_slurm_script_is_one_srun_task_per_gpu_requeued_and_signalled_before_the_limit():
    assert cmd.slurm_script(CLUSTER, slurm_job()) == SCRIPT
    assert "--gpus-per-task" not in SCRIPT  # jax #28194: every task must see all of its node's GPUs


def test_slurm_script_minimal_and_with_options():
    text = cmd.slurm_script(
        cmd.Slurm(nodes=1, gpus_per_node=2, job_name="x", signal_seconds=60, chdir="/home/me/my repo",
                  sbatch_options=("--qos=high", "--exclusive")),
        slurm_job(env=(), no_progress=False),
    )  # fmt: skip
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert directives == [
        "#SBATCH --job-name=x", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2", "#SBATCH --gres=gpu:2",
        "#SBATCH --signal=TERM@60", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        "#SBATCH --output=%x-%j.out", "#SBATCH --qos=high", "#SBATCH --exclusive",
    ]  # fmt: skip
    assert text.endswith(
        "set -eu\ncd '/home/me/my repo'\nsrun --kill-on-bad-exit=1 bat-jax pretrain --config "
        "configs/pretrain/bat_base.py --workdir /shared/runs/bat_base --config.data.root=/shared/data/as2m\n"
    )


def test_slurm_plan_writes_the_script_then_submits_it_one_job_at_a_time():
    write, *submits = cmd.slurm_plan(cmd.Slurm(**{**CLUSTER.__dict__, "repeat": 2}), slurm_job())
    assert (write.path, write.text) == ("bat-jax-bat_base.sbatch", SCRIPT)
    assert [s.argv for s in submits] == [("sbatch", "--dependency=singleton", "bat-jax-bat_base.sbatch")] * 2
    assert cmd.render([write, *submits]) == (
        "# 1. write the batch script bat-jax-bat_base.sbatch\n"
        f"cat > bat-jax-bat_base.sbatch <<'BAT_JAX_SBATCH'\n{SCRIPT}BAT_JAX_SBATCH\n"
        "# 2. submit it (job 1 of 2; one job named bat-jax-bat_base at a time)\n"
        "sbatch --dependency=singleton bat-jax-bat_base.sbatch\n"
        "# 3. submit it (job 2 of 2; one job named bat-jax-bat_base at a time)\n"
        "sbatch --dependency=singleton bat-jax-bat_base.sbatch\n"
    )


def test_slurm_script_passes_bash_n_and_shellcheck(tmp_path):
    path = tmp_path / "job.sbatch"
    path.write_text(cmd.slurm_script(CLUSTER, slurm_job(workdir="/shared/runs/a b", env=(("A", "x y $z"),))))
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):  # warnings and errors (an info says '$z' does not expand: intended)
        subprocess.run(["shellcheck", "--severity=warning", str(path)], check=True)


# --- local ----------------------------------------------------------------------------------------------


def test_local_is_one_process_on_all_devices():
    (step,) = cmd.local_plan(job(workdir="runs/b", env=(("JAX_COMPILATION_CACHE_DIR", "/tmp/c"),)))
    assert step.argv == (".venv/bin/bat-jax", "pretrain", "--config", BASE, "--workdir", "runs/b",
                         "--config.data.root=/mnt/b/data/as2m", "--config.data.global_batch_size=384",
                         "--single-process")  # fmt: skip
    assert step.env == (("JAX_COMPILATION_CACHE_DIR", "/tmp/c"),)
    assert cmd.render([step]) == (
        "# 1. bat-jax pretrain on this machine's devices\n"
        "JAX_COMPILATION_CACHE_DIR=/tmp/c .venv/bin/bat-jax pretrain --config configs/pretrain/bat_base.py "
        "--workdir runs/b --config.data.root=/mnt/b/data/as2m --config.data.global_batch_size=384 "
        "--single-process\n"
    )


# --- quoting --------------------------------------------------------------------------------------------

ODD = "/mnt/b/runs/my run; $(touch pwned) 'x'"


def test_quoting_keeps_a_path_with_spaces_and_shell_characters_one_word_everywhere(tmp_path):
    overrides = (f"--config.data.root={ODD}",)
    (tpu_step,) = cmd.tpu_plan(POD, job(workdir=ODD, overrides=overrides, env=(("X", "a b"),)))
    assert shlex.split(cmd.render([tpu_step]).splitlines()[1]) == list(tpu_step.argv)  # the printed line
    words = shlex.split(tpu_step.argv[-1])  # as the worker's shell splits it
    assert words == ["cd", "bat-jax", "&&", "X=a b", ".venv/bin/bat-jax", "pretrain", "--config", BASE,
                     "--workdir", ODD, f"--config.data.root={ODD}"]  # fmt: skip
    (local,) = cmd.local_plan(job(workdir=ODD, overrides=overrides, env=(("X", "a b"),)))
    assert shlex.split(local.shell()) == ["X=a b", *local.argv]
    script = cmd.slurm_script(CLUSTER, slurm_job(workdir=ODD, overrides=overrides))
    srun = shlex.split(script.splitlines()[-1])
    assert srun[srun.index("--workdir") + 1] == ODD and srun[-1] == f"--config.data.root={ODD}"
    # and a real shell agrees: the printed local command, run by bash with `printf` as bat-jax
    printed = cmd.local_plan(job(workdir=ODD, overrides=overrides, bat_jax="printf"))[0].shell()
    out = subprocess.run(["bash", "-c", printed.replace("printf", "printf '%s\\n'", 1)], cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert ODD in out.splitlines() and not (tmp_path / "pwned").exists()


# --- the command line: --dry-run, refusals, missing tools -----------------------------------------------

TPU_ARGS = ["tpu", "--tpu", "my-pod", "--zone", "us-east5-a", "--project", "my-proj",
            "--remote-dir", "bat-jax", "--bat-jax", ".venv/bin/bat-jax", "--compilation-cache", "gs://b/jax-cache",
            "--config", BASE, "--workdir", "/mnt/b/runs/bat_base",
            "--config.data.root=/mnt/b/data/as2m", "--config.data.global_batch_size=384"]  # fmt: skip
SLURM_ARGS = ["slurm", "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--account", "proj",
              "--time", "24:00:00", "--cpus-per-task", "12", "--compilation-cache", "/shared/jax-cache",
              "--no-progress", "--config", BASE, "--workdir", "/shared/runs/bat_base",
              "--config.data.root=/shared/data/as2m"]  # fmt: skip


@pytest.fixture
def nothing_runs(monkeypatch, tmp_path):
    """No subprocess, no exec, an empty PATH, and a fresh working directory."""

    def refuse(*a, **k):
        raise AssertionError(f"ran {a}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(os, "execvpe", refuse)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)


def test_dry_run_prints_exactly_the_plan_runs_nothing_and_exits_0(nothing_runs, tmp_path, capsys):
    rc, out, err = launch([*TPU_ARGS, "--dry-run"], capsys)
    assert (rc, err) == (0, "")
    assert out == cmd.render(cmd.tpu_plan(POD, job()))
    rc, out, err = launch([*SLURM_ARGS, "--dry-run"], capsys)
    assert (rc, err) == (0, "")
    assert out == cmd.render(cmd.slurm_plan(CLUSTER, slurm_job()))
    assert list(tmp_path.iterdir()) == []  # not even the batch script
    argv = ["local", "--bat-jax", "bat-jax", "--config", BASE, "--workdir", "runs/b", "--dry-run"]
    rc, out, err = launch(argv, capsys)
    assert (rc, err) == (0, "")
    assert (
        out
        == "# 1. bat-jax pretrain on this machine's devices\n"
        + shlex.join(["bat-jax", "pretrain", "--config", BASE, "--workdir", "runs/b", "--single-process"])
        + "\n"
    )


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["local", "--config", BASE, "--workdir", "gs://b/runs/x"],
         "--workdir: expected a path on a filesystem"),
        (["local", "--config", BASE, "--workdir", "r", "--config.data.root=gs://b/d"],
         "--config.data.root: expected a path on a filesystem"),
        (["local", "--config", BASE, "--workdir", "r", "--num-processes", "2"],
         "--num-processes: expected launcher flags (--help) or config overrides"),
        (["local", "--config", BASE, "--workdir", "r", "--config.train.steps", "5"],
         "--config.train.steps: expected launcher flags (--help) or config overrides"),
        (["local", "--config", BASE, "--workdir", "r", "--env", "1X=2"], "--env: expected NAME=VALUE"),
        (["local", "--config", BASE, "--workdir", "r\nBAT_JAX_SBATCH"],
         "--workdir: expected a value on one line"),
        (["tpu", "--tpu", "p", "--zone", "z", "--config", BASE, "--workdir", "runs/x"],
         "--workdir: expected an absolute path on a filesystem every worker shares"),
        (["tpu", "--tpu", "p", "--zone", "z", "--worker", "first", "--config", BASE, "--workdir", "/r"],
         "--worker: expected all, a worker number"),
        (["tpu", "--tpu", "p", "--zone", "z", "--mount-point", "/m", "--config", BASE, "--workdir", "/r"],
         "--mount-point: expected it with --mount-bucket"),
        (["tpu", "--tpu", "p", "--zone", "z", "--mount-bucket", "My Bucket", "--config", BASE,
          "--workdir", "/r"],
         "--mount-bucket: expected a bucket name"),
        (["slurm", "--nodes", "0", "--gpus-per-node", "8", "--config", BASE, "--workdir", "/r"],
         "--nodes: expected an integer >= 1, found 0"),
        (["slurm", "--nodes", "1", "--gpus-per-node", "8", "--sbatch-option=--gpus-per-task=1",
          "--config", BASE, "--workdir", "/r"], "--sbatch-option: expected no --gpus-per-task"),
        (["slurm", "--nodes", "1", "--gpus-per-node", "8", "--partition", "a b", "--config", BASE,
          "--workdir", "/r"], "--partition: expected a value without spaces"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_in_one_line_naming_the_flag(argv, expected, nothing_runs, capsys):
    rc, out, err = launch([*argv, "--dry-run"], capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"bat-jax launch {argv[0]}: error: {expected}"), err


@pytest.mark.parametrize("argv, tool", [(TPU_ARGS, "gcloud"), (SLURM_ARGS, "sbatch"), (
    ["local", "--bat-jax", "bat-jax", "--config", BASE, "--workdir", "r"], "bat-jax")])  # fmt: skip
def test_a_missing_tool_is_refused_before_anything_runs(argv, tool, nothing_runs, tmp_path, capsys):
    rc, out, err = launch(argv, capsys)
    assert rc == 2 and out == ""
    assert err.startswith(f"bat-jax launch {argv[0]}: error: {tool} not found on PATH; "), err
    assert err.rstrip().endswith("or pass --dry-run to print the commands")
    assert list(tmp_path.iterdir()) == []


def fake_tool(folder: Path, name: str, status: int = 0) -> Path:
    """An executable `name` that appends its arguments (one per line, then an empty line) to NAME.log."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    body = 'for a in "$@"; do printf "%s\\n" "$a"; done >> "$0.log"\necho >> "$0.log"'
    path.write_text(f"#!/bin/sh\n{body}\nexit {status}\n")
    path.chmod(0o755)
    return folder / f"{name}.log"


def calls(log: Path) -> list[list[str]]:
    return [c.split("\n") for c in log.read_text().split("\n\n") if c]


def test_tpu_runs_gcloud_with_exactly_the_printed_commands(monkeypatch, tmp_path, capsys):
    log = fake_tool(tmp_path / "bin", "gcloud")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    argv = [*TPU_ARGS, "--mount-bucket", "my-bucket"]
    rc, out, err = launch(argv, capsys)
    assert rc == 0, err
    plan = cmd.tpu_plan(cmd.Tpu(**{**POD.__dict__, "mount_bucket": "my-bucket"}), job())
    assert calls(log) == [list(step.argv[1:]) for step in plan]
    assert err.splitlines() == [f"bat-jax launch tpu: {i}. {step.label}" for i, step in enumerate(plan, 1)]
    log.unlink()
    fake_tool(tmp_path / "bin", "gcloud", status=3)  # the mount fails: the run is not started
    rc, out, err = launch(argv, capsys)
    assert rc == 3 and len(calls(log)) == 1
    assert "bat-jax launch tpu: error: step 1 (gcloud) exited with status 3" in err


def test_slurm_writes_the_script_and_submits_it(monkeypatch, tmp_path, capsys):
    log = fake_tool(tmp_path / "bin", "sbatch")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    rc, out, err = launch([*SLURM_ARGS, "--repeat", "2", "--script", "jobs/my job.sbatch"], capsys)
    assert rc == 0, err
    assert (tmp_path / "jobs" / "my job.sbatch").read_text() == SCRIPT
    assert calls(log) == [["--dependency=singleton", "jobs/my job.sbatch"]] * 2


def test_the_printed_slurm_plan_is_a_runnable_shell_script(tmp_path, capsys):
    log = fake_tool(tmp_path / "bin", "sbatch")
    rc, out, _ = launch([*SLURM_ARGS, "--dry-run"], capsys)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", out], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "bat-jax-bat_base.sbatch").read_text() == SCRIPT
    assert calls(log) == [["--dependency=singleton", "bat-jax-bat_base.sbatch"]]


# --- the entry points: bat-jax launch, python -m bat_jax.launch, launch/*.sh ---------------------------


def test_bat_jax_launch_is_a_subcommand(capsys):
    from bat_jax import cli as top

    assert top.SUBCOMMANDS["launch"] == "bat_jax.launch.cli"
    argv = ["local", "--bat-jax", "bat-jax", "--config", BASE, "--workdir", "r", "--config.train.steps=3"]
    assert top.main(["launch", *argv, "--dry-run"]) == 0
    assert capsys.readouterr().out == launch([*argv, "--dry-run"], capsys)[1]


@pytest.mark.parametrize(
    "script, launcher", [("tpu_pod.sh", "tpu"), ("slurm.sh", "slurm"), ("local.sh", "local")]
)
def test_shell_scripts_check_and_print_the_same_dry_run(script, launcher, capsys):
    path = REPO / "launch" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(path)], check=True)
    args = {"tpu": TPU_ARGS, "slurm": SLURM_ARGS, "local": ["local", "--config", BASE, "--workdir", "runs/b"]}
    argv = [*args[launcher][1:], "--bat-jax", "bat-jax", "--dry-run"]
    env = {**os.environ, "BAT_JAX_PYTHON": sys.executable}
    done = subprocess.run([str(path), *argv], env=env, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout == launch([launcher, *argv], capsys)[1]
    module = subprocess.run([sys.executable, "-m", "bat_jax.launch", launcher, *argv], capture_output=True,
                            text=True, cwd=REPO)  # fmt: skip
    assert module.stdout == done.stdout


def readme_launch_commands() -> list[list[str]]:
    """Every `bat-jax launch ...` command in README's "Scaling up" section (continued lines joined)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Scaling up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith("bat-jax launch ")]


def test_readme_examples_are_valid_launch_commands(nothing_runs, capsys):
    found = readme_launch_commands()
    assert {c[2] for c in found} == {"tpu", "slurm", "local"}, found
    for argv in found:
        rc, out, err = launch([*argv[2:], "--dry-run"], capsys)
        assert rc == 0 and out.startswith("# 1. "), (argv, err)


# --- a real run -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A synthetic prepared folder at 64 frames per clip (as tests/train/conftest.py makes it)."""
    from bat_jax import cli as top

    root = tmp_path_factory.mktemp("prepared") / "d64"
    argv = ["prepare", "--source", "synthetic", "--out", str(root), "--num-clips", "24",
            "--num-eval-clips", "4", "--clip-seconds", "0.63", "--workers", "1", "--no-progress"]  # fmt: skip
    assert top.main(argv) == 0
    return root


@pytest.mark.slow
def test_local_launcher_runs_a_real_tiny_pretraining(data_root, tmp_path):
    """launch/local.sh without --dry-run: STEPS updates of the tiny config, in a workdir whose name has a
    space. (Resuming is bat-jax pretrain's, tested in tests/train; the launchers repeat its command.)"""
    workdir = tmp_path / "my run"
    # the overrides of tests/train (4 steps at 64 frames): their compiled programs are in the session's cache
    argv = [str(REPO / "launch" / "local.sh"), "--no-progress", "--config", TINY, "--workdir", str(workdir),
            *overrides(data_root)]  # fmt: skip
    env = {**os.environ, "BAT_JAX_PYTHON": sys.executable, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (workdir / "checkpoints" / str(STEPS)).is_dir() and (workdir / "metrics.jsonl").is_file()
    assert (
        "mesh {'data': 8, 'fsdp': 1}, 8 cpu devices" in done.stdout + done.stderr
    )  # one process, all devices
