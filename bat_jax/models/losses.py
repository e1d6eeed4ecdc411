"""Probe training losses: asymmetric loss (AudioSet), BCE-with-logits (multi-label), softmax cross-entropy.

BCE and cross-entropy are optax's (``optax.sigmoid_binary_cross_entropy``, ``optax.softmax_cross_entropy``
and its integer-label form) with torch's reductions around them; the asymmetric loss has no optax twin.
Pure functions of logits [..., C] and targets; computed in float32; ``reduction`` is "mean" (over every
element, as torch), "sum" or "none".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Array = jax.Array

_WHERE = "bat_jax/models/losses.py"
REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss: Array, reduction: str) -> Array:
    if reduction == "mean":
        return jnp.mean(loss)
    if reduction == "sum":
        return jnp.sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"loss reduction ({_WHERE}): expected one of {REDUCTIONS}, found {reduction!r}")


def _check_same_shape(fn: str, logits: Array, targets: Array) -> None:
    if logits.shape != targets.shape:
        raise ValueError(
            f"{fn} ({_WHERE}): targets must have the logits' shape {tuple(logits.shape)}, "
            f"found {tuple(targets.shape)}"
        )


def asymmetric_loss(
    logits: Array,
    targets: Array,
    *,
    gamma_neg: float = 1.0,
    gamma_pos: float = 0.0,
    clip: float = 0.0,
    eps: float = 1e-8,
    reduction: str = "mean",
) -> Array:
    """Asymmetric loss for multi-label targets (Ridnik et al. 2021), as the reference's
    ``AsymmetricLossMultiLabel``; defaults are the probing setting (gamma_neg=1, gamma_pos=0, clip=0).

    With p = σ(x) and p₋ = min(1 − p + clip, 1) (clip > 0) or 1 − p:
        ℓ = −w · [y log max(p, eps) + (1 − y) log max(p₋, eps)],
        w = (1 − p_t)^γ,  p_t = y p + (1 − y) p₋,  γ = γ₊ y + γ₋ (1 − y).
    The focusing weight w is a constant for the gradient (computed without gradient in the reference).
    """
    _check_same_shape("asymmetric_loss", logits, targets)
    x = logits.astype(jnp.float32)
    y = targets.astype(jnp.float32)
    p_pos = jax.nn.sigmoid(x)
    p_neg = 1.0 - p_pos
    if clip > 0:
        p_neg = jnp.minimum(p_neg + clip, 1.0)
    loss = y * jnp.log(jnp.maximum(p_pos, eps)) + (1.0 - y) * jnp.log(jnp.maximum(p_neg, eps))
    if gamma_neg > 0 or gamma_pos > 0:
        p_t = jax.lax.stop_gradient(p_pos * y + p_neg * (1.0 - y))
        gamma = gamma_pos * y + gamma_neg * (1.0 - y)
        loss = loss * jnp.power(1.0 - p_t, gamma)
    return _reduce(-loss, reduction)


def bce_with_logits(logits: Array, targets: Array, *, reduction: str = "mean") -> Array:
    """Binary cross-entropy on logits (torch's binary_cross_entropy_with_logits), element-wise
    ``optax.sigmoid_binary_cross_entropy`` in float32 (stable for large |x|), then reduced."""
    _check_same_shape("bce_with_logits", logits, targets)
    loss = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))
    return _reduce(loss, reduction)


def softmax_cross_entropy(
    logits: Array, labels: Array, *, label_smoothing: float = 0.0, reduction: str = "mean"
) -> Array:
    """Softmax cross-entropy (torch's cross_entropy) over the last axis of logits [..., C], by optax.

    labels: integer class indices [...] (``optax.softmax_cross_entropy_with_integer_labels``) or class
    probabilities [..., C] (``optax.softmax_cross_entropy``). label_smoothing ε mixes the target with the
    uniform distribution, (1 − ε) target + ε / C (``optax.smooth_labels``). "mean" averages over the examples.
    """
    x = logits.astype(jnp.float32)  # [..., C]
    num_classes = x.shape[-1]
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != x.shape[:-1]:
            raise ValueError(
                f"softmax_cross_entropy ({_WHERE}): integer labels must have shape {tuple(x.shape[:-1])}, "
                f"found {tuple(labels.shape)}"
            )
        if not label_smoothing:
            return _reduce(optax.softmax_cross_entropy_with_integer_labels(x, labels), reduction)
        target = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [..., C]
    else:
        _check_same_shape("softmax_cross_entropy", x, labels)
        target = labels.astype(jnp.float32)
    if label_smoothing:
        target = optax.smooth_labels(target, label_smoothing)
    return _reduce(optax.softmax_cross_entropy(x, target), reduction)
