"""`load_encoder`: one entry point for every encoder checkpoint format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.convert import checkpoint, mapping, sources, workdir
from bat_jax.convert.errors import CheckpointError
from bat_jax.models.config import EncoderConfig
from bat_jax.models.encoder import FrozenEncoder

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
ACCEPTED = (
    "a Hugging Face BAT folder (model.safetensors + config.json), a model.safetensors file with its sibling "
    "config.json, a BAT .pt checkpoint (student.encoder.* tensors), an EAT/SSLAM fairseq .pt checkpoint, "
    "a bat-jax checkpoint folder (config.json + params/, written by `bat-jax convert`), or a `bat-jax "
    "pretrain` workdir (config.json + checkpoints/)"
)


def resolve_heads(explicit: int | None, from_file: int | None, what: str, where: str) -> int:
    """The number of attention heads: the argument and the file must agree; one of them must say it."""
    if explicit is not None and from_file is not None and explicit != from_file:
        raise ValueError(f"{where}: num_heads={explicit} was passed but {what} says {from_file}")
    heads = explicit if explicit is not None else from_file
    if heads is None:
        raise ValueError(
            f"{where}: the checkpoint does not say how many attention heads the encoder has; pass "
            "num_heads (load_encoder(path, num_heads=N) or `bat-jax convert SRC OUT --num-heads N`; "
            "ViT-B: 12, ViT-S: 6)"
        )
    return int(heads)


def config_for(src: sources.SourceState, num_heads: int | None) -> EncoderConfig:
    """The architecture: the file's config.json when it has one, else tensor shapes + the head count."""
    if src.config is not None:
        heads = resolve_heads(num_heads, src.config.num_heads, "its config.json", src.where)
        return src.config.replace(num_heads=heads)
    heads = resolve_heads(num_heads, src.num_heads, "its stored model config", src.where)
    base = EncoderConfig()
    if src.layer_norm_first is not None:
        base = base.replace(layer_norm_first=src.layer_norm_first)
    if src.eps is not None:
        base = base.replace(eps=src.eps)
    try:
        return mapping.infer_config(src.state, heads, src.where, base)
    except ValueError as e:
        raise CheckpointError(
            f"{src.where}: the tensors and num_heads={heads} do not make an encoder: {e}"
        ) from e


def read_source(path: Path) -> sources.SourceState:
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return sources.read_hf(path)
    elif path.suffix == ".safetensors":
        return sources.read_hf(path)
    elif path.suffix in TORCH_SUFFIXES:
        return sources.read_torch(path)
    raise CheckpointError(f"{path}: not a recognised encoder checkpoint; expected {ACCEPTED}")


def load_weights(
    path: str | Path, *, num_heads: int | None = None, step: int | None = None, teacher: bool = False
) -> tuple[EncoderConfig, Any, str]:
    """(config, float32 numpy params, kind) from any accepted checkpoint, stored in any floating dtype.

    kind is "bat_jax", "hf", "bat_pt", "fairseq" or "workdir" (a `bat-jax pretrain` workdir: the latest
    checkpoint's student encoder, or ``step``'s, or with ``teacher=True`` the EMA teacher). A file that
    cannot be read, does not match its config or holds NaN/Inf raises CheckpointError (a ValueError)
    naming the file and the reason; a missing path FileNotFoundError; a .pt file without torch installed
    ImportError.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder; expected {ACCEPTED}")
    if workdir.is_workdir(path):
        config, params = workdir.load_workdir(path, step=step, teacher=teacher)
        resolve_heads(num_heads, config.num_heads, "its config.json", str(path))
        return config, params, "workdir"
    if step is not None or teacher:
        raise ValueError(
            f"{path}: step= and teacher= select a checkpoint of a `bat-jax pretrain` workdir (a folder with "
            "config.json and checkpoints/); this is not one"
        )
    if path.is_dir() and (meta := checkpoint.read_own_config(path)) is not None:
        config, params = checkpoint.load_own(path, meta)
        resolve_heads(num_heads, config.num_heads, "its config.json", str(path))
        return config, params, "bat_jax"
    src = read_source(path)
    config = config_for(src, num_heads)
    config, params = mapping.import_reference_state(src.state, config, src.where, src.names)
    return config, params, src.kind


def load_encoder(
    path: str | Path,
    *,
    num_heads: int | None = None,
    dtype: Any = jnp.float32,
    step: int | None = None,
    teacher: bool = False,
) -> FrozenEncoder:
    """Load a frozen encoder from any supported checkpoint.

    Accepted: a Hugging Face BAT folder or `model.safetensors` (+ sibling `config.json`), a BAT `.pt`
    (`student.encoder.*`), an EAT/SSLAM fairseq `.pt`, a bat-jax checkpoint folder, or a `bat-jax pretrain`
    workdir (the latest checkpoint's student encoder; `step=S` a given step, `teacher=True` the EMA teacher,
    both only for a workdir). The architecture is
    read from the file (config.json, or tensor shapes); `num_heads` is needed only when the file does not
    name it (and must agree when it does). The file may store float32, float16 or bfloat16 tensors;
    parameters and computation use `dtype`. Errors: see `load_weights`.
    """
    config, params, _ = load_weights(path, num_heads=num_heads, step=step, teacher=teacher)
    name = jnp.dtype(dtype).name
    config = config.replace(dtype=name, param_dtype=name)
    params = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), name), params)
    return FrozenEncoder(config, params)
