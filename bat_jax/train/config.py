"""ml_collections configs (configs/**/*.py) → the dataclasses, optimizer and loader arguments the code uses.

Where the numbers live: in the config files, as big_vision does. ``configs/pretrain/bat_base.py`` is the
paper's recipe (PAPER.md §2.4), written once; ``bat_small.py``, ``eat_style.py`` and ``tiny.py`` start from
its ``get_config()`` and state only what differs. The code has no recipe defaults: ``SSLConfig``,
``make_optimizer``, the masking functions and ``ema_decay`` take every number as a required argument, and
this module builds them from a config. The encoder's architecture is the preset the config names
(``encoder.preset``, a key of ``bat_jax.models.config.PRESETS``) with ``encoder.overrides`` applied.

    cfg = load("configs/pretrain/bat_base.py")          # or pretrain_config("bat_base") in a checkout
    ssl, tx = ssl_config(cfg), optimizer(cfg)
    loader = make_pretrain_loader(paths, **loader_kwargs(cfg))

``cfg.frames`` (top level) is the one number of spectrogram frames per clip: the SSL objective's patch
grid (``SSLConfig.frames``) and the loader's crop / pad length (``target_frames``) both read it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import optax

from bat_jax.models.config import PRESETS, EncoderConfig
from bat_jax.models.ssl_objective import SSLConfig
from bat_jax.train.step import make_optimizer

_WHERE = "bat_jax/train/config.py"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the configs/ folder of a source checkout
# Loader arguments a pretraining config's `data` section sets (paths come from data.root and data.split).
LOADER_KEYS = ("global_batch_size", "seed", "worker_count")


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


def pretrain_config(name: str) -> ml_collections.ConfigDict:
    """configs/pretrain/<name>.py of this checkout (bat_base, bat_small, eat_style, tiny) → its config.

    Only from a source checkout: the configs/ folder sits beside the package (CONFIG_DIR) and is not
    installed with it. With an installed package, pass the file's path to `load` instead."""
    path = CONFIG_DIR / "pretrain" / f"{name}.py"
    if not path.is_file():
        found = sorted(p.stem for p in (CONFIG_DIR / "pretrain").glob("[!_]*.py"))
        raise FileNotFoundError(
            f"pretrain_config ({_WHERE}): expected one of {found} in {CONFIG_DIR / 'pretrain'}, "
            f"found no {path.name}; the named configs exist only in a source checkout: otherwise pass the "
            "config file's path to bat_jax.train.config.load('path/to/config.py')"
        )
    return load(str(path))


def _check_keys(section: str, given: Mapping[str, Any], required: set[str], allowed: set[str]) -> None:
    """Every required key present and no unknown key, or a ValueError naming both lists."""
    missing, unknown = sorted(required - set(given)), sorted(set(given) - allowed)
    if missing or unknown:
        raise ValueError(
            f"config section {section!r} ({_WHERE}): expected the keys {sorted(required)} "
            f"(optional: {sorted(allowed - required)}); missing {missing}, unknown {unknown}"
        )


def _required_and_allowed_fields(cls: type) -> tuple[set[str], set[str]]:
    fields = dataclasses.fields(cls)
    required = {
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    return required, {f.name for f in fields}


def _required_and_allowed_args(fn: Callable[..., Any]) -> tuple[set[str], set[str]]:
    params = inspect.signature(fn).parameters.values()
    return {p.name for p in params if p.default is p.empty}, {p.name for p in params}


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


def frames(cfg: ml_collections.ConfigDict) -> int:
    """cfg.frames: spectrogram frames per clip, shared by the SSL objective and the loader."""
    if "frames" not in cfg:
        raise ValueError(
            f"config ({_WHERE}): expected a top-level key 'frames' (spectrogram frames per clip), found keys "
            f"{sorted(cfg.keys())}"
        )
    return int(cfg.frames)


def ssl_config(cfg: ml_collections.ConfigDict) -> SSLConfig:
    """SSLConfig from cfg.encoder, cfg.frames and cfg.ssl (every other SSLConfig field, by name)."""
    required, allowed = _required_and_allowed_fields(SSLConfig)
    own = {"encoder", "frames"}  # taken from cfg.encoder and cfg.frames, not from cfg.ssl
    ssl = dict(cfg.ssl)
    _check_keys("ssl", ssl, required - own, allowed - own)
    return SSLConfig(encoder=encoder_config(cfg), frames=frames(cfg), **ssl)


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """make_optimizer(**cfg.optim, total_steps=cfg.train.steps): every argument named in the config; the
    schedule's length is the run's length, cfg.train.steps (its one home)."""
    optim = dict(cfg.optim)
    required, allowed = _required_and_allowed_args(make_optimizer)
    _check_keys("optim", optim, required - {"total_steps"}, allowed - {"total_steps"})
    if "train" not in cfg or "steps" not in cfg.train:
        raise ValueError(f"config ({_WHERE}): expected train.steps (the run's length), found none")
    return make_optimizer(**optim, total_steps=int(cfg.train.steps))


def loader_kwargs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of ``bat_jax.data.pipeline.make_pretrain_loader`` from the config (all but the
    shard paths, which come from cfg.data.root and cfg.data.split): ``target_frames`` is cfg.frames and
    ``frames_multiple`` the config's encoder's time patch size (the loader's own default, 16, is BAT's)."""
    missing = sorted(set(LOADER_KEYS) - set(cfg.data))
    if missing:
        raise ValueError(
            f"config section 'data' ({_WHERE}): expected the keys {list(LOADER_KEYS)}, missing {missing}"
        )
    return {
        "target_frames": frames(cfg),
        "frames_multiple": encoder_config(cfg).patch_size[0],
        **{key: cfg.data[key] for key in LOADER_KEYS},
    }


def ssl_preset(name: str, **overrides: Any) -> SSLConfig:
    """The SSLConfig of configs/pretrain/<name>.py with dataclass fields replaced, e.g.
    ``ssl_preset("tiny", frames=64, num_views=2)`` (tests and benchmarks). Only from a source checkout
    (see `pretrain_config`); elsewhere: ``ssl_config(load("path/to/config.py")).replace(...)``."""
    return ssl_config(pretrain_config(name)).replace(**overrides)
