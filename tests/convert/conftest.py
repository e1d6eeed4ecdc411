"""Fixtures of the weight-import tests: the golden tiny BAT encoder (dim 64, depth 3, 4 heads) in its HF
folder and .pt forms, and its reference outputs."""

import numpy as np
import pytest
from safetensors.numpy import load_file


@pytest.fixture(scope="module")
def bat_dir(golden_dir):
    return golden_dir / "bat_encoder"


@pytest.fixture(scope="module")
def bat_golden(bat_dir):
    return dict(np.load(bat_dir / "golden.npz"))


@pytest.fixture(scope="module")
def bat_state(bat_dir):
    return load_file(str(bat_dir / "model.safetensors"))
