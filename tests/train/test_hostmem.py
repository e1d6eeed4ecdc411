"""bat_jax/train/hostmem.py: the training job re-executes itself once with glibc.malloc.hugetlb=1.

The effect is checked on the mechanism, not on time: a 256 MiB block allocated, touched, freed and allocated
again page-faults again page by page under glibc's defaults (mmap'd and unmapped, 4 KiB pages) and about
once per 2 MiB with the tunable (transparent huge pages, where the kernel offers them on madvise).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bat_jax.train import hostmem

GLIBC = hostmem.glibc_supported()
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc.malloc.hugetlb needs Linux with glibc >= 2.35")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
THP_MODE = THP.read_text().split("[")[1].split("]")[0] if THP.exists() else "never"  # always/madvise/never

# Prints the pid, GLIBC_TUNABLES and the minor page faults of touching a freed-then-reallocated 256 MiB block.
PROBE = """
import os, resource, sys
from bat_jax.train import hostmem
pid = os.getpid()
hostmem.maybe_reexec()
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch():  # malloc itself (numpy would madvise huge pages on its own), 256 MiB
    block = libc.malloc(1 << 28)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, 1 << 28)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults
touch()
print(pid, os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), touch(), hostmem.active(), sep="|")
"""


def run_probe(**env):
    environ = {k: v for k, v in os.environ.items() if k not in (hostmem.ENV, hostmem.TUNABLES)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    pid_before, pid_after, tunables, faults, active = out.stdout.strip().split("|")
    return int(pid_before), int(pid_after), tunables, int(faults), active


@needs_glibc
def test_reexec_keeps_the_pid_sets_the_tunable_and_big_blocks_fault_in_huge_pages():
    pid_before, pid_after, tunables, faults, active = run_probe()
    assert pid_before == pid_after  # os.execv: the same process (signals, SLURM, parents see no change)
    assert tunables.split(":") == ["glibc.malloc.hugetlb=1"]
    assert active == "hugepages"
    pages = (1 << 28) // os.sysconf("SC_PAGE_SIZE")
    if THP_MODE in ("always", "madvise"):  # 128 faults when every 2 MiB is a huge page; 4 KiB pages: 65536
        assert faults < pages // 4, f"{faults} page faults touching a fresh 256 MiB block ({pages} pages)"


@needs_glibc
def test_system_keeps_glibc_defaults_and_the_block_faults_again():
    pid_before, pid_after, tunables, faults, active = run_probe(**{hostmem.ENV: "system"})
    assert (pid_before, tunables, active) == (pid_after, "", "system")
    pages = (1 << 28) // os.sysconf("SC_PAGE_SIZE")
    # glibc mmaps the block and unmaps it on free: touching it again faults every page (unless the kernel
    # gives huge pages unasked, THP "always": then at least one fault per 2 MiB)
    assert faults >= (pages // 2 if THP_MODE != "always" else (1 << 28) // (2 << 20))


def test_users_tunables_win_and_others_are_kept():
    assert hostmem.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == {}  # the user's own choice
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    if GLIBC:
        assert hostmem.wanted(other) == hostmem.HUGE_PAGES
        merged = hostmem.tunables_with(other["GLIBC_TUNABLES"], hostmem.wanted(other))
        assert merged == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hostmem.wanted({hostmem.ENV: "system"}) == {}


def test_a_bad_choice_is_refused_naming_the_variable():
    expected = r"BAT_JAX_HOST_MALLOC: expected one of hugepages, system, found 'fast'"
    with pytest.raises(ValueError, match=expected):
        hostmem.wanted({hostmem.ENV: "fast"})


def test_bad_choice_on_the_command_line_is_one_line_exit_2(tmp_path):
    env = {**os.environ, hostmem.ENV: "fast"}
    out = subprocess.run(
        [sys.executable, "-m", "bat_jax.cli", "pretrain", "--help"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 2
    expected = "bat-jax pretrain: BAT_JAX_HOST_MALLOC: expected one of hugepages, system, found 'fast'"
    assert out.stderr.strip() == expected
    assert "Traceback" not in out.stderr


def test_import_bat_jax_does_not_load_jax():
    loads = "print('jax' in sys.modules)"
    code = f"import sys, bat_jax; {loads}; bat_jax.audio.logmel; {loads}"

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "True"], out.stderr
