"""Reference (PyTorch) probe heads (the official ``models/heads.py``) → params of `bat_jax.models.probes`.

    params = probe_params_from_reference("cgp", arrays, like=jax.eval_shape(lambda: init_params(probe, key)))

``arrays``: the head's state dict as numpy (``prototype_vectors`` [K, D, 1, 1], ``block_attention`` [L],
``fc.weight`` [C, in], ``fc.bias`` [C], optional ``ln.weight`` / ``ln.bias``, the H2T ``group_scale`` buffer,
which is recomputed and ignored). Every error (an unknown probe, missing or unknown keys, a wrong shape, a
NaN/Inf value) is a CheckpointError (a ValueError) naming the key, in the reference's layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bat_jax.convert.errors import CheckpointError
from bat_jax.convert.mapping import check_finite, place
from bat_jax.models.encoder import unbox
from bat_jax.models.probes import PROBE_NAMES

_WHERE = "bat_jax/convert/probes.py"

# Reference (torch) head keys -> our parameter path, and buffers that carry no learned state.
_REF_KEYS = {
    "block_attention": ("gate_logits",),
    "prototype_vectors": ("prototypes",),
    "fc.weight": ("fc", "kernel"),
    "fc.bias": ("fc", "bias"),
    "ln.weight": ("ln", "scale"),
    "ln.bias": ("ln", "bias"),
}
_REF_LAYOUT = {  # torch layout (for messages) and rank once converted
    "block_attention": ("[L]", 1),
    "prototype_vectors": ("[K, D, 1, 1]", 2),
    "fc.weight": ("[C, in]", 2),
    "fc.bias": ("[C]", 1),
    "ln.weight": ("[in]", 1),
    "ln.bias": ("[in]", 1),
}
_REF_BUFFERS = {"group_scale"}  # H2T: √(group size), recomputed by group_lasso_penalty
_REF_REQUIRED = {
    "cgp": {"block_attention", "prototype_vectors", "fc.weight", "fc.bias"},
    "lcgp": {"block_attention", "fc.weight", "fc.bias"},
    "h2t": {"fc.weight", "fc.bias"},
    "lp": {"fc.weight", "fc.bias"},
    "protobin": {"prototype_vectors", "fc.weight", "fc.bias"},
}
_REF_NORM = {"ln.weight", "ln.bias"}  # optional LayerNorm of LCGP, H2T, LP (head_norm)


def probe_params_from_reference(
    name: str,
    arrays: Mapping[str, Any],
    *,
    prefix: str = "",
    like: Mapping[str, Any] | None = None,
    where: str | None = None,
) -> dict[str, Any]:
    """Convert a reference (PyTorch) head's weights into the params of `bat_jax.models.probes` (float32).

    arrays: torch-layout tensors as numpy arrays, keyed as in the head's state dict
    (``prototype_vectors`` [K, D, 1, 1], ``block_attention`` [L], ``fc.weight`` [C, in], ``fc.bias`` [C],
    ``ln.weight`` / ``ln.bias``); with ``prefix`` (e.g. "head.") only keys starting with it are read.
    like: optional params (or ``jax.eval_shape`` of them) whose shapes the result must match.
    where: the file the arrays come from, for error messages.
    """
    who = f"{where or 'probe_params_from_reference'} ({_WHERE})"
    if name not in PROBE_NAMES:
        raise CheckpointError(f"{who}: unknown probe {name!r}, expected one of {PROBE_NAMES}")
    family = "cgp" if name.startswith("cgp") else name
    found = {k[len(prefix) :]: np.asarray(v) for k, v in arrays.items() if k.startswith(prefix)}
    required = _REF_REQUIRED[family]
    optional = (_REF_NORM if family in ("lcgp", "h2t", "lp") else set()) | _REF_BUFFERS
    missing = sorted(required - set(found))
    unknown = sorted(set(found) - required - optional)
    if missing or unknown:
        raise CheckpointError(
            f"{who}: {name!r} expects keys {sorted(required)} (optional {sorted(optional)}); "
            f"missing {missing}, unexpected {unknown}"
        )
    if len(_REF_NORM & set(found)) == 1:
        raise CheckpointError(f"{who}: {name!r} needs both ln.weight and ln.bias, or neither")
    check_finite({prefix + k: v for k, v in found.items() if k not in _REF_BUFFERS}, who)

    converted: dict[tuple[str, ...], np.ndarray] = {}
    for key, value in found.items():
        if key in _REF_BUFFERS:
            continue
        if key == "prototype_vectors" and value.ndim == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]  # 1×1 conv kernel [K, D, 1, 1] -> [K, D]
        layout, rank = _REF_LAYOUT[key]
        if value.ndim != rank:
            raise CheckpointError(
                f"{who}: {name!r} key {key!r} expected {layout}, found shape {found[key].shape}"
            )
        converted[_REF_KEYS[key]] = value.T if key == "fc.weight" else value  # fc: [C, in] -> [in, C]

    want = _implied_shapes(family, converted)
    if like is not None:
        flat_like = {
            tuple(getattr(k, "key", k) for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(_without_params_key(unbox(like)))
        }
        if set(flat_like) != set(converted):
            raise CheckpointError(
                f"{who}: {name!r} converts to params {sorted(converted)}, the probe has {sorted(flat_like)} "
                "(LayerNorm present in one and not the other?)"
            )
        want.update(flat_like)
    for path, shape in want.items():
        if tuple(converted[path].shape) != tuple(shape):
            key = next(k for k, v in _REF_KEYS.items() if v == path)
            found_shape, want_shape = _torch_shape(key, converted[path]), _torch_shape(key, np.empty(shape))
            raise CheckpointError(
                f"{who}: {name!r} key {key!r} has shape {found_shape}, expected {want_shape}"
            )

    params: dict[str, Any] = {}
    for path, value in converted.items():
        place(params, path, jnp.asarray(np.asarray(value, np.float32)))
    return params


def _without_params_key(params: Mapping[str, Any]) -> Mapping[str, Any]:
    """Params with or without the outer "params" key (of `init_params` / `model.init`), as the inner tree."""
    return params["params"] if "params" in params else params


def _implied_shapes(family: str, converted: dict[tuple[str, ...], np.ndarray]) -> dict[tuple, tuple]:
    """Shapes each weight must have given the others (our layout): the fc input width is 3K for CGP,
    K for PB and the LayerNorm width when there is one; the bias has one entry per class."""
    num_classes = converted[("fc", "bias")].shape[0]
    fan_in = converted[("fc", "kernel")].shape[0]
    want: dict[tuple, tuple] = {("fc", "bias"): (num_classes,)}
    if ("prototypes",) in converted:
        num_prototypes, dim = converted[("prototypes",)].shape
        fan_in = 3 * num_prototypes if family == "cgp" else num_prototypes
        want[("prototypes",)] = (num_prototypes, dim)
    if ("ln", "scale") in converted:
        fan_in = converted[("ln", "scale")].shape[0]
        want[("ln", "scale")] = want[("ln", "bias")] = (fan_in,)
    want[("fc", "kernel")] = (fan_in, num_classes)
    if ("gate_logits",) in converted:
        want[("gate_logits",)] = (converted[("gate_logits",)].shape[0],)
    return want


def _torch_shape(key: str, value: np.ndarray) -> tuple[int, ...]:
    """A converted array's shape in the reference's layout, for error messages."""
    if key == "fc.weight":
        return tuple(reversed(value.shape))
    if key == "prototype_vectors" and value.ndim == 2:
        return (*value.shape, 1, 1)
    return tuple(value.shape)
