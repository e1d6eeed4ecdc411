import os
from pathlib import Path

import pytest

# Tests run on the CPU with 8 simulated devices, so sharding code is exercised everywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

GOLDEN = Path(__file__).parent / "golden"  # reference outputs of the official PyTorch code


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN
