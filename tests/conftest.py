import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# Tests run on the CPU with 8 simulated devices, so sharding code is exercised everywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

GOLDEN = Path(__file__).parent / "golden"  # reference outputs of the official PyTorch code

_CACHE_ROOT = "BAT_JAX_TESTS_JAX_CACHE"  # the session's cache folder, made by the first pytest process


def pytest_configure(config):
    """A JAX persistent compilation cache for this test session only. Many tests compile the same programs
    (the tiny config's init and training step: ~15 s each on 2 busy cores), in this process and in the
    `bat-jax` subprocesses they start, which inherit the environment; the cache compiles each once.

    A fresh folder per session, removed at its end, shared by the xdist workers. Concurrent processes need
    jax's file lock on the entries (taken when the cache has a size limit, with the `filelock` package); where
    that package is missing, each worker gets a folder of its own. The in-memory jit caches that tests count
    (``_cache_size``, traces) and the "Compiling ..." log lines are not affected. A JAX_COMPILATION_CACHE_DIR
    set by the caller is kept as it is."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ and _CACHE_ROOT not in os.environ:
        return  # the caller's own cache
    if _CACHE_ROOT not in os.environ:  # the controller (or the only process): xdist workers inherit it
        os.environ[_CACHE_ROOT] = tempfile.mkdtemp(prefix="bat-jax-tests-jax-cache-")
        config._bat_jax_cache_owner = True
    folder = Path(os.environ[_CACHE_ROOT])
    if importlib.util.find_spec("filelock") is not None:
        os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(64 << 30)  # a limit never reached: the lock
    else:
        folder /= os.environ.get("PYTEST_XDIST_WORKER", "main")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    if "jax" in sys.modules:  # imported before this hook (it reads the environment at import): tell it too
        import jax

        jax.config.update("jax_compilation_cache_dir", str(folder))
        jax.config.update(
            "jax_compilation_cache_max_size", int(os.environ.get("JAX_COMPILATION_CACHE_MAX_SIZE", -1))
        )


def pytest_unconfigure(config):
    if getattr(config, "_bat_jax_cache_owner", False):
        shutil.rmtree(os.environ.pop(_CACHE_ROOT), ignore_errors=True)


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN
