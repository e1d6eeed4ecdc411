"""The reference (PyTorch) SSL student → bat-jax params: its `encoder.*` (the encoder layout of
`bat_jax.convert.mapping`) and its ViT `decoder.*`.

Reference decoder keys (without the `decoder.` prefix): `pos_embed` [1, N, D] (trainable, kept as is),
`mask_token` [1, 1, D], `in_proj.weight` [D, D_in] (only when D ≠ D_in), `blocks.{i}.*` (the encoder's
block layout at the decoder's sizes), `out_proj.weight` [D_in, D].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bat_jax.convert.errors import CheckpointError
from bat_jax.convert.mapping import (
    Target,
    check_finite,
    check_keys,
    convert_tensors,
    import_reference_state,
    reference_key_map,
)
from bat_jax.models.config import EncoderConfig
from bat_jax.models.decoder import DecoderConfig
from bat_jax.models.ssl_objective import SSLConfig


def _block_key_map(config: DecoderConfig) -> dict[str, Target]:
    """The `blocks.{i}.*` entries of the encoder key map, at the decoder's sizes (same block layout)."""
    as_encoder = EncoderConfig(
        dim=config.width,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        qkv_bias=config.qkv_bias,
        use_gate=config.use_gate,
    )
    return {k: v for k, v in reference_key_map(as_encoder).items() if k.startswith("blocks.")}


def decoder_key_map(config: DecoderConfig) -> dict[str, Target]:
    """Every reference decoder key (no `decoder.` prefix) → its bat-jax path, reference shape, conversion."""
    d, d_in, n = config.width, config.in_dim, config.num_patches
    key_map = dict(_block_key_map(config))
    key_map["pos_embed"] = Target(("pos_embed",), (1, n, d), lambda x: x.reshape(n, d))
    key_map["mask_token"] = Target(("mask_token",), (1, 1, d), lambda x: x.reshape(d))
    key_map["out_proj.weight"] = Target(("out_proj", "kernel"), (d_in, d), lambda x: x.T)
    if d != d_in:
        key_map["in_proj.weight"] = Target(("in_proj", "kernel"), (d, d_in), lambda x: x.T)
    return key_map


def decoder_params_from_reference(
    state: Mapping[str, np.ndarray], config: DecoderConfig, where: str
) -> dict[str, Any]:
    """Reference decoder tensors (keys without the `decoder.` prefix) → plain float32 numpy params.
    Strict: missing, unexpected, misshapen or non-finite tensors raise CheckpointError."""
    key_map = decoder_key_map(config)
    check_keys(state, set(key_map), where)
    check_finite(state, where)
    return convert_tensors(state, key_map, where, f"a decoder with {config}")


def ssl_params_from_reference(
    state: Mapping[str, np.ndarray], config: SSLConfig, where: str
) -> dict[str, Any]:
    """The reference student's tensors (``encoder.*``, ``decoder.*``; numpy) → plain float32 numpy params
    ``{"encoder", "decoder"}`` for `bat_jax.models.ssl_objective`. Strict: missing, unexpected, misshapen or
    non-finite tensors raise CheckpointError."""
    parts: dict[str, dict[str, np.ndarray]] = {"encoder": {}, "decoder": {}}
    stray = []
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix in parts and rest:
            parts[prefix][rest] = value
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"{where}: expected only 'encoder.*' and 'decoder.*' keys of a reference SSL student, found "
            f"{sorted(stray)[:8]}"
        )
    enc_cfg, encoder = import_reference_state(parts["encoder"], config.encoder, f"{where} (encoder.*)")
    if enc_cfg.pos_grid != config.encoder.pos_grid:
        raise CheckpointError(
            f"{where}: encoder.pos_embed uses the sin-cos grid {enc_cfg.pos_grid}, expected the config's "
            f"{config.encoder.pos_grid}"
        )
    decoder = decoder_params_from_reference(parts["decoder"], config.decoder, f"{where} (decoder.*)")
    return {"encoder": encoder, "decoder": decoder}
