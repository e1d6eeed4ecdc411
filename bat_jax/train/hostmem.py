"""Host memory for the training jobs on CPU: glibc malloc asked for transparent huge pages, by re-executing
the process once with ``GLIBC_TUNABLES`` set (glibc reads its tunables only at process start).

Why: XLA:CPU allocates every step's temporaries afresh (gigabytes for the pretraining step at 1024 frames)
and frees them at the end of the step. glibc serves a block over 32 MB with its own mmap and unmaps it on
free, so every step the kernel page-faults all of it again, one fault per 4 KiB page (~750k faults per step
at the 192-wide config). With ``HUGE_PAGES`` (``glibc.malloc.hugetlb=1``, glibc >= 2.35) those blocks are
madvised for transparent huge pages: one fault per 2 MiB, the resident size unchanged
(benchmarks/RESULTS.md). Keeping freed memory instead (``arena_max=1:mmap_max=0``, no trimming) removes the
faults too, but was measured to fragment the single heap: 2.4x the resident memory and steps 2-4x slower
now and then; it is not offered.

    maybe_reexec()        # first thing in a job's entry point: returns, or replaces the process

Set ``BAT_JAX_HOST_MALLOC=system`` to keep glibc's defaults. Nothing happens off Linux/glibc >= 2.35, when
the process already runs with these tunables, or when GLIBC_TUNABLES already sets the same key (the user's
choice wins). The process keeps its PID, arguments, environment and open files (``os.execv``).
"""

from __future__ import annotations

import os
import platform
import sys

ENV = "BAT_JAX_HOST_MALLOC"  # "hugepages" (default) or "system"
TUNABLES = "GLIBC_TUNABLES"
HUGE_PAGES = {"glibc.malloc.hugetlb": "1"}  # madvise(MADV_HUGEPAGE) on malloc's mmap'd blocks and heap
CHOICES = ("hugepages", "system")
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def wanted(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The tunables to add for this environment: ``HUGE_PAGES`` unless opted out, not on Linux with glibc
    >= 2.35, or its key is already in GLIBC_TUNABLES (then nothing: the process is as the user set it)."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV, CHOICES[0]).strip().lower() or CHOICES[0]
    if choice not in CHOICES:
        raise ValueError(f"{ENV}: expected one of {', '.join(CHOICES)}, found {env[ENV]!r}")
    if choice == "system" or not glibc_supported():
        return {}
    if parse_tunables(env.get(TUNABLES, "")).keys() & HUGE_PAGES.keys():
        return {}
    return dict(HUGE_PAGES)


def parse_tunables(text: str) -> dict[str, str]:
    """GLIBC_TUNABLES text ``key=value:key=value`` → {key: value} (an entry without '=' maps to "")."""
    return dict((item.split("=", 1) + [""])[:2] for item in text.split(":") if item)


def glibc_supported() -> bool:
    """Linux with glibc >= `MIN_GLIBC`."""
    if not sys.platform.startswith("linux"):
        return False
    libc, version = platform.libc_ver()
    try:
        return libc == "glibc" and tuple(int(p) for p in version.split(".")[:2]) >= MIN_GLIBC
    except ValueError:
        return False


def tunables_with(current: str, extra: dict[str, str]) -> str:
    """GLIBC_TUNABLES ``current`` with the ``extra`` key=value pairs appended (':'-separated)."""
    return ":".join([p for p in current.split(":") if p] + [f"{k}={v}" for k, v in extra.items()])


def maybe_reexec() -> None:
    """Replace this process by the same command with `HUGE_PAGES` in GLIBC_TUNABLES (see the module doc);
    return without doing anything when `wanted` says nothing is to be added. Call it before any work:
    the command runs again from its start."""
    extra = wanted()
    if not extra:
        return
    os.environ[TUNABLES] = tunables_with(os.environ.get(TUNABLES, ""), extra)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def active() -> str:
    """What this process runs with, for the job's first line: "hugepages" (the `HUGE_PAGES` tunables are set
    and glibc reads them) or "system"."""
    current = parse_tunables(os.environ.get(TUNABLES, ""))
    ok = glibc_supported() and all(current.get(k) == v for k, v in HUGE_PAGES.items())
    return "hugepages" if ok else "system"
