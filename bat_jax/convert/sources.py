"""Readers for the released PyTorch encoder formats, all returning reference-layout numpy tensors.

* Hugging Face BAT: a folder with `model.safetensors` + `config.json`, or the `.safetensors` file with
  its sibling `config.json` (`lrauch/BAT-vit-b16-pretrainedAS2M` layout).
* BAT `.pt` (the authors' `BAT_base.pt`): `student.encoder.<key>` tensors, possibly under `state_dict`.
* EAT / SSLAM fairseq `.pt`: `{"model": {"modality_encoders.IMAGE.…", "blocks.{i}.…"}, "cfg": …}`.

Tensors keep the dtype they are stored in (float16, bfloat16 as `ml_dtypes.bfloat16`, float32 …); a file
that cannot be read (truncated, random bytes, not a checkpoint) is a `CheckpointError` naming it.
torch is imported lazily, only for `.pt` files (`pip install 'bat-jax[torch]'`).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from bat_jax.convert.errors import CheckpointError, one_line
from bat_jax.convert.hf import encoder_config_from_hf
from bat_jax.models.config import EncoderConfig

TORCH_HINT = "reading PyTorch .pt checkpoints needs torch: pip install 'bat-jax[torch]'"

# BAT .pt: the encoder the reference uses downstream is the student's.
BAT_PT_PREFIX = "student.encoder."
# EAT / SSLAM fairseq checkpoints → reference names (exact keys, then prefixes).
FAIRSEQ_IMAGE = "modality_encoders.IMAGE."
FAIRSEQ_KEYS = {
    FAIRSEQ_IMAGE + "extra_tokens": "cls_token",
    FAIRSEQ_IMAGE + "fixed_positional_encoder.positions": "pos_embed",
}
FAIRSEQ_PREFIXES = {
    FAIRSEQ_IMAGE + "local_encoder.proj.": "patch_embed.proj.",
    FAIRSEQ_IMAGE + "context_encoder.norm.": "pre_norm.",
    "blocks.": "blocks.",
}
# Parts of a fairseq pretraining checkpoint that are not the encoder (EMA teacher, decoders, loss
# projections); the reference loader leaves them out too. Any other unmapped key is an error.
FAIRSEQ_TRAINING_ONLY = (
    "_ema",
    FAIRSEQ_IMAGE + "decoder.",
    "shared_decoder.",
    "recon_proj.",
    "cls_proj.",
    "center",
)


@dataclasses.dataclass
class SourceState:
    """Reference-layout tensors read from a file, plus what the file says about the architecture."""

    kind: str  # "hf", "bat_pt", "fairseq"
    state: dict[str, np.ndarray]
    where: str
    config: EncoderConfig | None = None  # full architecture (config.json)
    num_heads: int | None = None  # heads named by the file when there is no full config
    layer_norm_first: bool | None = None
    eps: float | None = None
    names: dict[str, str] = dataclasses.field(default_factory=dict)  # reference key → key in the file


# ----------------------------------------------------------------------------------------------------
# Hugging Face


def read_hf_config(path: Path) -> EncoderConfig:
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the encoder config.json ({one_line(e)})") from e
    if not isinstance(hf, Mapping):
        raise CheckpointError(f"{path}: expected a JSON object (the config), found {type(hf).__name__}")
    return encoder_config_from_hf(hf, where=str(path))


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, in its stored dtype; CheckpointError naming the file when the
    file is truncated, random or otherwise unreadable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return dict(load_file(str(path)))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        size = path.stat().st_size if path.is_file() else 0
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({one_line(e)}; {size:,} bytes); the file is truncated "
            "or damaged, or not a checkpoint: download or copy it again"
        ) from e


def read_hf(path: Path) -> SourceState:
    """A HF folder (model.safetensors + config.json) or a .safetensors file with a sibling config.json."""
    weights = path / "model.safetensors" if path.is_dir() else path
    config_path = weights.parent / "config.json"
    if not weights.is_file():
        raise FileNotFoundError(f"{path}: expected model.safetensors in this folder")
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{weights}: expected its config.json beside it ({config_path}) to know the architecture"
        )
    config = read_hf_config(config_path)
    return SourceState("hf", read_safetensors(weights), str(weights), config=config)


def sibling_hf_config(path: Path) -> EncoderConfig | None:
    """The HF-style config.json beside a .pt file, if there is one (it names the heads)."""
    candidate = path.parent / "config.json"
    if not candidate.is_file():
        return None
    try:
        hf = json.loads(candidate.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(hf, Mapping) or "hidden_size" not in hf:
        return None
    return encoder_config_from_hf(hf, where=str(candidate))


# ----------------------------------------------------------------------------------------------------
# PyTorch


def import_torch() -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(TORCH_HINT) from e
    return torch


def load_torch_file(path: Path) -> Any:
    """torch.load on the CPU, tensors only; fairseq checkpoints that pickle their config objects
    (omegaconf / argparse) are re-read with weights_only=False — only load files you trust.
    A file torch cannot read (truncated, random bytes, not a torch file) is a CheckpointError naming it."""
    torch = import_torch()
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if not any(word in text for word in ("omegaconf", "argparse", "fairseq")):
            # torch's message is a paragraph on weights_only; the reason follows "WeightsUnpickler error:".
            reason = text.rpartition("WeightsUnpickler error:")[2] if "WeightsUnpickler" in text else text
            raise _unreadable_torch(path, one_line(pickle.UnpicklingError(reason))) from e
    except Exception as e:  # torch raises RuntimeError, EOFError, OSError, … for a bad file
        raise _unreadable_torch(path, f"{type(e).__name__}: {one_line(e)}") from e
    # fairseq stores its run config as omegaconf/argparse objects, which the safe loader rejects.
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except ImportError as e:
        raise CheckpointError(
            f"{path}: the checkpoint pickles objects of a package that is not installed ({one_line(e)})"
        ) from e
    except Exception as e:  # as above
        raise _unreadable_torch(path, f"{type(e).__name__}: {one_line(e)}") from e


def _unreadable_torch(path: Path, reason: str) -> CheckpointError:
    size = path.stat().st_size if path.is_file() else 0
    return CheckpointError(
        f"{path}: not a readable PyTorch checkpoint ({reason}; {size:,} bytes); the file is truncated or "
        "damaged, or not a checkpoint: download or copy it again"
    )


def to_numpy(value: Any, key: str, where: str) -> np.ndarray:
    """A tensor as numpy in its stored dtype (bfloat16 as ml_dtypes.bfloat16, which torch cannot export)."""
    torch = import_torch()
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{where}: {key!r} is a {type(value).__name__}, expected a tensor")
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        return value.to(torch.float32).numpy().astype(ml_dtypes.bfloat16)  # exact: bf16 ⊂ float32
    return value.numpy()


def _get(cfg: Any, key: str) -> Any:
    if cfg is None:
        return None
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            return cfg.get(key)
        except (AttributeError, TypeError):
            return None
    return getattr(cfg, key, None)


def read_fairseq(obj: Mapping[str, Any], where: str) -> SourceState:
    model = obj["model"]
    state, names = {}, {}
    for key, value in model.items():
        if key.startswith(FAIRSEQ_TRAINING_ONLY):
            continue
        new = FAIRSEQ_KEYS.get(key)
        if new is None:
            prefix = next((p for p in FAIRSEQ_PREFIXES if key.startswith(p)), None)
            new = FAIRSEQ_PREFIXES[prefix] + key[len(prefix) :] if prefix else key
        state[new] = to_numpy(value, key, where)
        names[new] = key
    model_cfg = _get(obj.get("cfg"), "model") or obj.get("args")
    heads, lnf, eps = (_get(model_cfg, k) for k in ("num_heads", "layer_norm_first", "norm_eps"))
    return SourceState(
        "fairseq",
        state,
        where,
        num_heads=None if heads is None else int(heads),
        layer_norm_first=None if lnf is None else bool(lnf),
        eps=None if eps is None else float(eps),
        names=names,
    )


def read_bat_pt(obj: Mapping[str, Any], path: Path) -> SourceState:
    where = str(path)
    flat = obj.get("state_dict", obj)
    state, names = {}, {}
    for key, value in flat.items():
        if key.startswith(BAT_PT_PREFIX):  # other entries: decoder, teacher, optimizer … (not the encoder)
            new = key[len(BAT_PT_PREFIX) :]
            state[new] = to_numpy(value, key, where)
            names[new] = key
    return SourceState("bat_pt", state, where, config=sibling_hf_config(path), names=names)


def read_torch(path: Path) -> SourceState:
    """A BAT .pt or an EAT/SSLAM fairseq .pt, told apart by their keys."""
    obj = load_torch_file(path)
    where = str(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where}: expected a checkpoint dict, found a {type(obj).__name__}")
    model = obj.get("model")
    if isinstance(model, Mapping) and any(str(k).startswith(FAIRSEQ_IMAGE) for k in model):
        return read_fairseq(obj, where)
    flat = obj.get("state_dict", obj)
    if isinstance(flat, Mapping) and any(str(k).startswith(BAT_PT_PREFIX) for k in flat):
        return read_bat_pt(obj, path)
    top = sorted(str(k) for k in obj)[:10]
    raise CheckpointError(
        f"{where}: not a BAT or EAT/SSLAM checkpoint: expected '{BAT_PT_PREFIX}*' tensors (optionally under "
        f"'state_dict') or a fairseq 'model' dict with '{FAIRSEQ_IMAGE}*' keys; found top-level keys {top}"
    )
