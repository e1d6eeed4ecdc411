"""Pieces of BAT's self-supervised objective (data2vec 2.0 style) that need no network: teacher targets,
the global + local losses and the variance metrics (the EMA teacher update: bat_jax.models.ema). All are
pure jnp functions.

Conventions: B clips, V views per clip, N patch tokens, D features, L teacher layers. Student rows are
clip-major (row ``b · V + v`` is view v of clip b, see ``bat_jax.models.masking``); teacher arrays have one
row per clip and are broadcast over the views, never materialised V times. Every loss and target is
computed in float32, whatever the dtype of the network outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

_WHERE = "bat_jax/models/ssl_losses.py"


# ----------------------------------------------------------------------------------------------------
# Teacher targets


def _normalize(x: Array, axis: int, eps: float) -> Array:
    """(x − mean) / sqrt(var + eps) along ``axis``, biased variance, no affine parameters."""
    mean = jnp.mean(x, axis=axis, keepdims=True)
    var = jnp.var(x, axis=axis, keepdims=True)  # biased (ddof 0), as torch's correction=0
    return (x - mean) * jax.lax.rsqrt(var + eps)


def ssl_targets(layer_outputs: Array, eps: float, *, instance_norm: bool, layer_norm: bool) -> Array:
    """Teacher targets [B, N, D] from per-layer patch tokens ``layer_outputs`` [L, B, N, D] (CLS excluded).

    Each layer is instance-normalised over the tokens (per clip and channel: mean and biased variance over
    N), the layers are averaged, and the average is normalised over the features (a layer norm without
    affine parameters). Both norms put ``eps`` inside the square root (the reference uses one eps for both).

    The function takes whatever per-layer outputs it is given: BAT feeds each block's complete output (EOB);
    the EAT / data2vec 2.0 variant feeds each block's FFN output before the residual add. The choice is the
    caller's (the encoder), not this function's.
    """
    if layer_outputs.ndim != 4:
        raise ValueError(
            f"ssl_targets ({_WHERE}): expected layer outputs [L, B, N, D], found shape {layer_outputs.shape}"
        )
    y = layer_outputs.astype(jnp.float32)  # [L, B, N, D]
    if instance_norm:
        y = _normalize(y, axis=2, eps=eps)  # over tokens N
    y = jnp.mean(y, axis=0)  # [B, N, D]
    if layer_norm:
        y = _normalize(y, axis=-1, eps=eps)  # over features D
    return y


# ----------------------------------------------------------------------------------------------------
# Losses


def _per_view(x: Array, num_views: int, name: str) -> Array:
    """[B·V, ...] -> [B, V, ...] (clip-major rows)."""
    if x.shape[0] % num_views:
        raise ValueError(
            f"ssl_losses ({_WHERE}): expected the rows of {name} to be a multiple of num_views={num_views}, "
            f"found {x.shape[0]}"
        )
    return x.reshape(x.shape[0] // num_views, num_views, *x.shape[1:])


def global_loss(student_cls: Array, targets: Array, num_views: int) -> Array:
    """MSE between the student's final CLS [B·V, D] and the token mean of the targets [B, N, D] (the same
    for the V views of a clip), averaged over rows and features. Float32 scalar."""
    cls = _per_view(student_cls.astype(jnp.float32), num_views, "student_cls")  # [B, V, D]
    utterance = jnp.mean(targets.astype(jnp.float32), axis=1)  # [B, D]
    return jnp.mean(jnp.square(cls - utterance[:, None]))


def local_loss(pred: Array, targets: Array, mask: Array, num_views: int) -> Array:
    """Mean over masked patches of the per-patch MSE (mean over D) between the decoder output [B·V, N, D]
    and the targets [B, N, D]; ``mask`` [B·V, N] is 1/True where a patch was masked. Float32 scalar."""
    pred = _per_view(pred.astype(jnp.float32), num_views, "pred")  # [B, V, N, D]
    weight = _per_view(mask.astype(jnp.float32), num_views, "mask")  # [B, V, N]
    per_patch = jnp.mean(jnp.square(pred - targets.astype(jnp.float32)[:, None]), axis=-1)  # [B, V, N]
    return jnp.sum(per_patch * weight) / jnp.sum(weight)


def masked_targets(targets: Array, ids_masked: Array, num_views: int) -> Array:
    """The targets [B, N, D] at each view's masked patches ``ids_masked`` [B·V, M]: [B, V, M, D] float32."""
    ids = _per_view(ids_masked, num_views, "ids_masked")  # [B, V, M]
    return jax.vmap(lambda t, i: t[i])(targets.astype(jnp.float32), ids)  # [B, V, M, D]


def local_loss_masked(pred: Array, targets: Array, ids_masked: Array, num_views: int) -> Array:
    """`local_loss` from the predictions at the masked patches only: ``pred`` [B·V, M, D] at ``ids_masked``
    [B·V, M] (every view masks the same M patches' count, so the mean over masked patches is a plain mean).
    Float32 scalar."""
    pred = _per_view(pred.astype(jnp.float32), num_views, "pred")  # [B, V, M, D]
    return jnp.mean(jnp.square(pred - masked_targets(targets, ids_masked, num_views)))


def ssl_losses(
    pred: Array,
    student_cls: Array,
    targets: Array,
    mask: Array,
    num_views: int,
    global_weight: float,
    local_weight: float,
    ids_masked: Array | None = None,
) -> dict[str, Array]:
    """BAT's objective: ``loss = global_weight · global_loss + local_weight · local_loss`` (equal in BAT;
    data2vec 2.0 / EAT scale the global term instead). Shapes: ``pred`` [B·V, N, D] decoder output,
    ``student_cls`` [B·V, D], ``targets`` [B, N, D], ``mask`` [B·V, N] (True = masked). With ``ids_masked``
    [B·V, M] (the masked patches, as ``mask`` says), ``pred`` is the decoder output at those patches only,
    [B·V, M, D] (`local_loss_masked`)."""
    b, n, d = targets.shape
    rows_n = n if ids_masked is None else ids_masked.shape[-1]
    expected = {
        "pred": (b * num_views, rows_n, d),
        "student_cls": (b * num_views, d),
        "mask": (b * num_views, n),
    }
    for name, x in (("pred", pred), ("student_cls", student_cls), ("mask", mask)):
        if tuple(x.shape) != expected[name]:
            raise ValueError(
                f"ssl_losses ({_WHERE}): expected {name} of shape {expected[name]} for targets "
                f"{tuple(targets.shape)} and num_views={num_views}, found {tuple(x.shape)}"
            )
    g = global_loss(student_cls, targets, num_views)
    if ids_masked is None:
        loc = local_loss(pred, targets, mask, num_views)
    else:
        loc = local_loss_masked(pred, targets, ids_masked, num_views)
    return {"loss": global_weight * g + local_weight * loc, "global_loss": g, "local_loss": loc}


# ----------------------------------------------------------------------------------------------------
# Metrics


Moments = tuple[Array, Array, Array]  # (count [], mean [D], sum of squared deviations [D])


def feature_moments(x: Array, where: Array | None = None) -> Moments:
    """(count [], mean [D], sum of squared deviations [D]) of ``x`` [..., D] over its rows (the leading axes
    flattened; ``where`` [...] selects rows), float32: `feature_std` in a form that merges over row sets
    (`merge_moments`), e.g. over the micro-batches of an accumulated step."""
    x = x.astype(jnp.float32).reshape(-1, x.shape[-1])  # [R, D]
    w = jnp.ones(x.shape[:1], jnp.float32) if where is None else where.reshape(-1).astype(jnp.float32)  # [R]
    count = jnp.sum(w)
    mean = jnp.sum(x * w[:, None], axis=0) / count  # [D]
    return count, mean, jnp.sum(jnp.square(x - mean) * w[:, None], axis=0)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """The moments of two row sets together (Chan, Golub & LeVeque's pairwise update); ``a`` may be empty
    (count 0), ``b`` may not."""
    (na, ma, sa), (nb, mb, sb) = a, b
    n = na + nb
    delta = mb - ma  # [D]
    return n, ma + delta * (nb / n), sa + sb + jnp.square(delta) * (na * nb / n)


def moments_std(moments: Moments, eps: float = 1e-6) -> Array:
    """`feature_std` from moments: mean over features of sqrt(unbiased variance + eps)."""
    count, _, ssd = moments
    return jnp.mean(jnp.sqrt(ssd / (count - 1) + eps))


def feature_std(x: Array, where: Array | None = None, eps: float = 1e-6) -> Array:
    """data2vec 2.0's ``compute_var``: mean over features of sqrt(var + eps), the variance taken over every
    row (all leading axes flattened) with the unbiased estimator (torch's default). ``where`` [...] (the
    leading shape of x) restricts the rows, e.g. to masked patches. A collapse detector: targets or
    predictions that stop varying drive it to sqrt(eps)."""
    return moments_std(feature_moments(x, where), eps)


def target_var(targets: Array, *, moments: bool = False) -> Array | Moments:
    """``feature_std`` of the teacher targets [B, N, D] over all clips and tokens (data2vec's target_var);
    ``moments=True``: its `feature_moments` instead."""
    return feature_moments(targets) if moments else feature_std(targets)


def pred_var(pred: Array, mask: Array | None, *, moments: bool = False) -> Array | Moments:
    """``feature_std`` of the decoder output [B·V, N, D] over the masked patches (``mask`` [B·V, N]),
    the patches that enter the local loss (data2vec's pred_var); ``mask=None``: ``pred`` holds the masked
    patches only ([B·V, M, D]), all rows count. ``moments=True``: its `feature_moments`."""
    return feature_moments(pred, where=mask) if moments else feature_std(pred, where=mask)
