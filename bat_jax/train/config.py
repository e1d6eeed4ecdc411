"""ml_collections configs (configs/**/*.py) → the dataclasses and optimizer the code runs on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import ml_collections
import optax

from bat_jax.models.bat_ssl import SSLConfig
from bat_jax.models.config import PRESETS, EncoderConfig
from bat_jax.train.step import make_optimizer


def load(spec: str) -> ml_collections.ConfigDict:
    """`path/to/config.py` or `path/to/config.py:arg` (as ml_collections config flags) → its get_config()."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config: expected a Python file with get_config(), found no file at {path}")
    module_spec = importlib.util.spec_from_file_location(f"_bat_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config {path}: expected a get_config() function, found none")
    return module.get_config(arg) if arg else module.get_config()


def encoder_config(cfg: ml_collections.ConfigDict) -> EncoderConfig:
    """cfg.encoder.preset (a name of bat_jax.models.config.PRESETS) with cfg.encoder.overrides applied."""
    preset = cfg.encoder.preset
    if preset not in PRESETS:
        raise ValueError(f"config encoder.preset: expected one of {sorted(PRESETS)}, found {preset!r}")
    overrides = dict(cfg.encoder.get("overrides", {}))
    for key in ("patch_size", "pos_grid"):
        if key in overrides:
            overrides[key] = tuple(overrides[key])
    return PRESETS[preset](**overrides)


def ssl_config(cfg: ml_collections.ConfigDict) -> SSLConfig:
    """SSLConfig from cfg.encoder and cfg.ssl (every cfg.ssl key must be an SSLConfig field)."""
    return SSLConfig(encoder=encoder_config(cfg), **dict(cfg.ssl))


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    return make_optimizer(**dict(cfg.optim))
