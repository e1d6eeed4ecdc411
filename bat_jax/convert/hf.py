"""The Hugging Face `config.json` of the released BAT encoder (`lrauch/BAT-vit-b16-pretrainedAS2M`) →
`EncoderConfig`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bat_jax.convert.errors import CheckpointError
from bat_jax.models.config import EncoderConfig

REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads")


def encoder_config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> EncoderConfig:
    """The encoder architecture named by a HF BAT `config.json` (parsed); CheckpointError naming `where`
    when a required field is missing or the config asks for what bat-jax does not implement."""
    missing = [k for k in REQUIRED if k not in hf]
    if missing:
        raise CheckpointError(
            f"{where}: missing {missing}; expected a BAT encoder config with {list(REQUIRED)}"
        )
    if hf.get("pos_trainable", False):
        raise CheckpointError(
            f"{where}: pos_trainable is true; bat-jax supports fixed sin-cos positions only"
        )
    if hf.get("init_scale_values") is not None:
        raise CheckpointError(
            f"{where}: init_scale_values (LayerScale) is set; bat-jax encoders have no LayerScale"
        )
    input_shape = hf.get("input_shape", (1024, 128))
    try:
        return EncoderConfig(
            dim=int(hf["hidden_size"]),
            depth=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            mlp_ratio=float(hf.get("mlp_ratio", 4.0)),
            qkv_bias=bool(hf.get("qkv_bias", True)),
            use_gate=bool(hf.get("use_gate", True)),
            pre_norm=bool(hf.get("pre_norm", True)),
            layer_norm_first=bool(hf.get("layer_norm_first", False)),
            eps=float(hf.get("layer_norm_eps", 1e-6)),
            patch_size=tuple(hf.get("patch_size", (16, 16))),
            n_mels=int(input_shape[1]),
            chunk_time_patches=int(hf.get("chunk_time_patches", 64)),
        )
    except (TypeError, ValueError, IndexError) as e:
        raise CheckpointError(f"{where}: not a valid BAT encoder config ({e})") from e
