"""The reference (PyTorch) encoder layout ↔ bat-jax parameters: key map, shape checks, transposes.

The reference layout is the one of the official BAT `ViT` and of the Hugging Face release:
``patch_embed.proj.{weight,bias}``, ``pos_embed``, ``cls_token``, ``pre_norm.*``,
``blocks.{i}.{norm1,norm2}.*``, ``blocks.{i}.attn.{qkv,proj,gate}.*``, ``blocks.{i}.mlp.{fc1,fc2}.*``.
PyTorch stores linear weights [out, in] and the patch conv OIHW [D, 1, 16, 16]; bat-jax stores
kernels [in, out] with the head axes split out (see `bat_jax.models.layers`) and the conv HWIO.

Import is strict: a missing key, an unexpected key, a shape that disagrees with the config or a NaN/Inf
value is a `CheckpointError` naming the file, the key(s) and what was found — never a silent partial load.
Tensors may be stored in any floating dtype (float32, float16, bfloat16, ...); the imported params are
float32 numpy arrays (`load_encoder` casts them to the compute dtype).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from bat_jax.convert.errors import CheckpointError
from bat_jax.models.config import EncoderConfig
from bat_jax.models.layers import sincos_2d

POS_KEY = "pos_embed"
# Max |checkpoint table − recomputed sin-cos table| accepted as the same layout: 1e-4 for a float32 table
# (float32 round-off ~1e-6), else POS_ULPS units of the stored dtype at 1.0 (the table lies in [-1, 1],
# rounding to the dtype moves an entry by at most eps/2): float16 1.95e-3, bfloat16 1.56e-2. A table of
# another layout, or a learned one, is off by O(1).
POS_TOLERANCE = 1e-4
POS_ULPS = 2
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one reference tensor goes: bat-jax parameter path, expected reference shape, conversion."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray]


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _linear(x: np.ndarray) -> np.ndarray:  # [out, in] → [in, out]
    return x.T


def reference_key_map(cfg: EncoderConfig) -> dict[str, Target]:
    """Every reference key the encoder `cfg` needs (except `pos_embed`, see `check_positions`)."""
    d, h, dh, m = cfg.dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    pt, pf = cfg.patch_size
    keys = {
        # OIHW [D, 1, pt, pf] → HWIO [pt, pf, 1, D]
        "patch_embed.proj.weight": Target(
            ("patch_embed", "kernel"), (d, 1, pt, pf), lambda x: x.transpose(2, 3, 1, 0)
        ),
        "patch_embed.proj.bias": Target(("patch_embed", "bias"), (d,), _same),
        "cls_token": Target(("cls_token",), (1, 1, d), lambda x: x.reshape(d)),
    }
    if cfg.pre_norm:
        keys["pre_norm.weight"] = Target(("pre_norm", "scale"), (d,), _same)
        keys["pre_norm.bias"] = Target(("pre_norm", "bias"), (d,), _same)
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", f"blocks_{i}"
        for norm in ("norm1", "norm2"):
            keys[f"{src}{norm}.weight"] = Target((dst, norm, "scale"), (d,), _same)
            keys[f"{src}{norm}.bias"] = Target((dst, norm, "bias"), (d,), _same)
        # qkv: output index s·D + h·Dh + j (s ∈ {q, k, v}) → kernel [D, 3, H, Dh]
        keys[f"{src}attn.qkv.weight"] = Target(
            (dst, "attn", "qkv", "kernel"), (3 * d, d), lambda x: x.reshape(3, h, dh, d).transpose(3, 0, 1, 2)
        )
        if cfg.qkv_bias:
            keys[f"{src}attn.qkv.bias"] = Target(
                (dst, "attn", "qkv", "bias"), (3 * d,), lambda x: x.reshape(3, h, dh)
            )
        # proj reads the concatenated heads (index h·Dh + j) → kernel [H, Dh, D]
        keys[f"{src}attn.proj.weight"] = Target(
            (dst, "attn", "proj", "kernel"), (d, d), lambda x: x.T.reshape(h, dh, d)
        )
        keys[f"{src}attn.proj.bias"] = Target((dst, "attn", "proj", "bias"), (d,), _same)
        if cfg.use_gate:
            keys[f"{src}attn.gate.weight"] = Target(
                (dst, "attn", "gate", "kernel"), (d, d), lambda x: x.T.reshape(d, h, dh)
            )
            keys[f"{src}attn.gate.bias"] = Target(
                (dst, "attn", "gate", "bias"), (d,), lambda x: x.reshape(h, dh)
            )
        keys[f"{src}mlp.fc1.weight"] = Target((dst, "mlp", "fc1", "kernel"), (m, d), _linear)
        keys[f"{src}mlp.fc1.bias"] = Target((dst, "mlp", "fc1", "bias"), (m,), _same)
        keys[f"{src}mlp.fc2.weight"] = Target((dst, "mlp", "fc2", "kernel"), (d, m), _linear)
        keys[f"{src}mlp.fc2.bias"] = Target((dst, "mlp", "fc2", "bias"), (d,), _same)
    return keys


def pos_tolerance(dtype: Any) -> float:
    """The sin-cos table tolerance for a table stored as `dtype` (see POS_TOLERANCE, POS_ULPS)."""
    return max(POS_TOLERANCE, POS_ULPS * float(ml_dtypes.finfo(dtype).eps))


def is_float(dtype: Any) -> bool:
    """numpy floating dtypes and the ml_dtypes ones (bfloat16, float8 …), which numpy calls void."""
    try:
        ml_dtypes.finfo(dtype)
    except (TypeError, ValueError):
        return False
    return True


def check_finite(state: Mapping[str, Any], where: str, names: Mapping[str, str] | None = None) -> None:
    """Raise CheckpointError naming every tensor that holds NaN or ±Inf, with how many such values."""
    bad = []
    for key, value in state.items():
        value = np.asarray(value)
        if not is_float(value.dtype):
            continue
        count = int(value.size - np.count_nonzero(np.isfinite(value)))
        if count:
            bad.append(f"{_original(key, names)!r} ({count} of {value.size} values)")
    if bad:
        raise CheckpointError(
            f"{where}: non-finite weights (NaN or Inf) in {_preview(bad, 5)}; expected finite values "
            "everywhere (a diverged run or a damaged file?)"
        )


def as_float32(value: Any, key: str, where: str) -> np.ndarray:
    """A stored tensor as float32 numpy (from any floating dtype); CheckpointError for other dtypes."""
    value = np.asarray(value)
    if not is_float(value.dtype):
        raise CheckpointError(
            f"{where}: tensor {key!r} is stored as {value.dtype}, expected a floating dtype"
        )
    return value.astype(np.float32)


def place(params: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> None:
    """params[path[0]][path[1]]… = value, creating the nested dicts."""
    node = params
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = value


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def _original(key: str, names: Mapping[str, str] | None) -> str:
    return names.get(key, key) if names else key


def check_keys(
    state: Mapping[str, Any], expected: set[str], where: str, names: Mapping[str, str] | None = None
) -> None:
    """Raise CheckpointError listing missing and unexpected keys (names given as the file spells them)."""
    missing = sorted(_original(k, names) for k in expected - set(state))
    unexpected = sorted(_original(k, names) for k in set(state) - expected)
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{where}: the checkpoint does not match the encoder config; " + "; ".join(problems)
        )


def check_shape(
    key: str, found: tuple[int, ...], expected: tuple[int, ...], where: str, cfg_note: str
) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointError(
            f"{where}: tensor {key!r} has shape {list(found)}, expected {list(expected)} for {cfg_note}"
        )


def describe(cfg: EncoderConfig) -> str:
    return (
        f"an encoder with dim={cfg.dim}, depth={cfg.depth}, num_heads={cfg.num_heads}, "
        f"mlp_dim={cfg.mlp_dim}, use_gate={cfg.use_gate}, pre_norm={cfg.pre_norm}, "
        f"patch_size={list(cfg.patch_size)}"
    )


def pos_grid_candidates(cfg: EncoderConfig) -> list[tuple[int, int]]:
    """The sin-cos layouts a checkpoint table may use: the config's, then (F', chunk) and (chunk, F')."""
    grids = [
        cfg.pos_grid,
        (cfg.freq_patches, cfg.chunk_time_patches),
        (cfg.chunk_time_patches, cfg.freq_patches),
    ]
    return list(dict.fromkeys(tuple(g) for g in grids))


def check_positions(table: np.ndarray, cfg: EncoderConfig, where: str, key: str = POS_KEY) -> EncoderConfig:
    """Match a checkpoint's position table [1, N, D] to a sin-cos layout; return cfg with that `pos_grid`.

    bat-jax recomputes the table (a constant, not a parameter). The reference loaders copy the
    checkpoint's table and slice its first entries; this checks that those entries are a 2-D sin-cos
    table and records which layout it uses (BAT's (8, 64) or EAT's (64, 8)).
    """
    needed = cfg.chunk_time_patches * cfg.freq_patches
    if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != cfg.dim or table.shape[1] < needed:
        check_shape(
            key, table.shape, (1, needed, cfg.dim), where, f"{describe(cfg)} (at least {needed} positions)"
        )
    stored = np.asarray(table).dtype
    used = as_float32(table[0, :needed], key, where)
    tolerance = pos_tolerance(stored)
    errors = {}
    for grid in pos_grid_candidates(cfg):
        if grid[0] * grid[1] < needed:
            continue
        err = float(np.max(np.abs(sincos_2d(cfg.dim, grid)[:needed] - used)))
        if err <= tolerance:
            return cfg.replace(pos_grid=grid)
        errors[grid] = err
    detail = ", ".join(f"grid {list(g)}: max |diff| {e:.3g}" for g, e in errors.items())
    raise CheckpointError(
        f"{where}: {key!r} is not a fixed 2-D sin-cos position table bat-jax can recompute ({detail}; "
        f"tolerance {tolerance:.3g} for a table stored as {stored}); learned or modified position tables "
        "are not supported"
    )


def import_reference_state(
    state: Mapping[str, np.ndarray],
    cfg: EncoderConfig,
    where: str,
    names: Mapping[str, str] | None = None,
) -> tuple[EncoderConfig, dict[str, Any]]:
    """Reference-layout tensors (numpy) → (cfg with the checked `pos_grid`, nested bat-jax params, numpy).

    `names` maps reference keys back to the file's own spelling for error messages (fairseq, BAT .pt).
    """
    key_map = reference_key_map(cfg)
    check_keys(state, set(key_map) | {POS_KEY}, where, names)
    check_finite(state, where, names)
    params = convert_tensors(state, key_map, where, describe(cfg), names)
    cfg = check_positions(np.asarray(state[POS_KEY]), cfg, where, _original(POS_KEY, names))
    return cfg, params


def convert_tensors(
    state: Mapping[str, Any],
    key_map: Mapping[str, Target],
    where: str,
    note: str,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Every key of `key_map`, shape-checked, converted, placed at its path: nested float32 numpy params."""
    params: dict[str, Any] = {}
    for key, target in key_map.items():
        value = np.asarray(state[key])
        check_shape(_original(key, names), value.shape, target.shape, where, note)
        value = as_float32(value, _original(key, names), where)
        place(params, target.path, np.ascontiguousarray(target.convert(value)))
    return params


# ----------------------------------------------------------------------------------------------------
# Architecture from tensor shapes (files without a config)


def infer_config(
    state: Mapping[str, np.ndarray], num_heads: int, where: str, base: EncoderConfig | None = None
) -> EncoderConfig:
    """Width, depth, MLP ratio, gate, pre-norm, qkv bias and patch size from reference-layout shapes."""
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointError(
                f"{where}: no {key!r}; cannot infer the encoder architecture from the tensors"
            )
    dim = int(state["cls_token"].shape[-1])
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    conv = state["patch_embed.proj.weight"].shape  # [D, 1, pt, pf]
    base = base or EncoderConfig()
    return base.replace(
        dim=dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        use_gate="blocks.0.attn.gate.weight" in state,
        pre_norm="pre_norm.weight" in state,
        patch_size=(int(conv[2]), int(conv[3])),
    )
