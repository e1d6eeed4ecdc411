"""bat-jax: BAT (Better Audio Transformer) and CGP (Convex Gated Probing) in JAX/Flax.

``bat_jax.audio`` and ``bat_jax.load_encoder`` are imported on first use, so that ``import bat_jax`` (and the
``bat-jax`` command's start, which may re-execute itself: ``bat_jax.train.hostmem``) does not load JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["audio", "load_encoder", "__version__"]

if TYPE_CHECKING:
    from bat_jax import audio
    from bat_jax.convert import load_encoder


def __getattr__(name: str) -> Any:
    if name == "audio":
        return importlib.import_module("bat_jax.audio")
    if name == "load_encoder":
        return importlib.import_module("bat_jax.convert").load_encoder
    raise AttributeError(f"module 'bat_jax' has no attribute {name!r}")
