"""The probes of one run, their losses and their optimizer.

Every requested probe reads the same frozen encoder outputs; their parameters form one pytree
``{name: params}`` trained by one AdamW, so one jitted step updates them all (AdamW is element-wise: one
optimizer over the union is the same as one per probe). The recipe (PAPER.md §1.3): AdamW β = (0.9, 0.999),
a linear warm-up then a cosine decay to `end_lr`, weight decay on the linear layers' weights only: the
parameters whose path matches ``optim.decay_regex`` (default ``(^|/)fc/kernel$``), so not the gate logits, the
prototypes, the VQT query tokens, the biases nor the LayerNorms. Hyper-parameter sweeps: the learning rate is
an injected hyper-parameter (``optax.inject_hyperparams``), set each step from the member's own peak.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from bat_jax.models import losses
from bat_jax.models.config import EncoderConfig
from bat_jax.models.probes import PROBE_NAMES, group_lasso_penalty, make_probe
from bat_jax.models.vqt import make_vqt_probe

Array = jax.Array
PyTree = Any

LOSSES = ("cross_entropy", "bce", "asymmetric")
GATED = ("cgp", "cgp_patch_avg", "cgp_frame", "lcgp")  # probes with a convex layer gate (gates.json)
FRAME_WISE = ("cgp_frame",)
PROTOTYPE_PROBES = ("cgp", "cgp_patch_avg", "cgp_frame", "protobin")
DEFAULT_DECAY_REGEX = r"(^|/)fc/kernel$"
VQT = "vqt"  # the one probe that runs the encoder itself (query tokens prepended at every block)
PER_LAYER = "per_layer_lp"  # option per_layer_lp: a linear probe on each layer's CLS token (Figure 4's view)
NAMES = (*PROBE_NAMES, VQT)


class ProbeConfigError(ValueError):
    """A probe config that cannot run: says the field, what was expected and what was found."""


def probe_names(value: Any) -> tuple[str, ...]:
    """`probes` as a list or a comma-separated string → validated names, in order, without repeats."""
    if isinstance(value, str):
        names = [n.strip() for n in value.split(",") if n.strip()]
    elif isinstance(value, Sequence):
        names = [str(n).strip() for n in value]
    else:
        raise ProbeConfigError(f"probes: expected a list of names or 'cgp,lp', found {value!r}")
    unknown = [n for n in names if n not in NAMES]
    if not names or unknown:
        raise ProbeConfigError(
            f"probes: expected names from {list(NAMES)}, found {names if not names else unknown}"
        )
    if len(set(names)) != len(names):
        raise ProbeConfigError(f"probes: expected each probe once, found {names}")
    return tuple(names)


def loss_name(cfg: ml_collections.ConfigDict, multilabel: bool) -> str:
    """The config's loss, "auto" → cross-entropy (single-label) or BCE (multi-label); checked against the
    data: cross-entropy needs exactly one label per clip."""
    name = cfg.loss
    if name == "auto":
        return "bce" if multilabel else "cross_entropy"
    if name not in LOSSES:
        raise ProbeConfigError(f"loss: expected 'auto' or one of {list(LOSSES)}, found {name!r}")
    if name == "cross_entropy" and multilabel:
        raise ProbeConfigError(
            "loss: cross_entropy needs one label per clip, but the training clips are multi-label; use "
            "--config.loss=bce (or asymmetric, or auto)"
        )
    return name


def frame_loss_name(cfg: ml_collections.ConfigDict) -> str:
    """The loss of the frame-wise probes (sound event detection: several events may overlap in a time
    patch): the config's loss, "auto" → BCE; cross-entropy is refused."""
    name = cfg.loss
    if name == "auto":
        return "bce"
    if name not in ("bce", "asymmetric"):
        raise ProbeConfigError(
            f"loss: frame-wise probes ({', '.join(FRAME_WISE)}) score each time patch against every class "
            f"(multi-label), so they need 'bce' or 'asymmetric' (or 'auto'), found {name!r}"
        )
    return name


def loss_fn(name: str) -> Callable[[Array, Array], Array]:
    """(logits [..., C], multi-hot targets [..., C]) → per-example loss [...]."""
    if name == "cross_entropy":
        return lambda logits, y: losses.softmax_cross_entropy(logits, y, reduction="none")
    if name == "bce":
        return lambda logits, y: jnp.mean(losses.bce_with_logits(logits, y, reduction="none"), axis=-1)
    # the reference's AsymmetricLossMultiLabel sums over classes and examples; per-example sums here
    return lambda logits, y: jnp.sum(
        losses.asymmetric_loss(logits, y, gamma_neg=1.0, gamma_pos=0.0, clip=0.0, reduction="none"), axis=-1
    )


def build(
    names: Sequence[str],
    cfg: ml_collections.ConfigDict,
    num_classes: int,
    num_layers: int,
    dim: int,
    encoder: EncoderConfig | None = None,
) -> dict[str, Any]:
    """{name: Linen probe} with the config's sizes (probe.num_prototypes, probe.dropout_rate). VQT needs the
    `encoder`'s config (it runs the encoder's blocks with its query tokens) and, as the reference, applies
    no head dropout; probe.vqt_queries sets its query tokens per block (10)."""
    heads = {}
    for name in names:
        if name == VQT:
            if encoder is None:
                raise ProbeConfigError("probes: vqt needs the encoder's config (build(..., encoder=))")
            heads[name] = make_vqt_probe(
                num_classes, encoder, num_queries=int(cfg.probe.get("vqt_queries", 10))
            )
            continue
        kw: dict[str, Any] = {"dropout_rate": float(cfg.probe.dropout_rate)}
        if name in PROTOTYPE_PROBES:
            kw["num_prototypes"] = int(cfg.probe.num_prototypes)
        heads[name] = make_probe(name, num_classes, num_layers, dim, **kw)
    if cfg.get("per_layer_lp", False):
        heads[PER_LAYER] = PerLayerLinearProbe(num_classes, num_layers, dim, float(cfg.probe.dropout_rate))
    return heads


class PerLayerLinearProbe(nn.Module):
    """L independent linear probes, one on each layer's CLS token (LayerNorm, dropout, linear, as `lp` on
    the last layer): logits [L, B, C]. Trained beside the other probes; its figures per layer go to
    per_layer_lp.json, the curve the layer gates are compared with (PAPER.md §4)."""

    num_classes: int
    num_layers: int
    dim: int
    dropout_rate: float = 0.2
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, cls: Array, patches: Array | None = None, *, deterministic: bool = True) -> Array:
        del patches
        x = jnp.asarray(cls, jnp.float32)  # [L, B, D]
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        scale = self.param("ln_scale", nn.initializers.ones, (self.num_layers, 1, self.dim))
        bias = self.param("ln_bias", nn.initializers.zeros, (self.num_layers, 1, self.dim))
        x = (x - mean) * jax.lax.rsqrt(var + self.norm_eps) * scale + bias
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        return _LayerwiseDense(self.num_classes, self.num_layers, self.dim, name="fc")(x)


class _LayerwiseDense(nn.Module):
    """x [L, B, D] → [L, B, C] with a kernel [L, D, C] (torch nn.Linear's init per layer)."""

    features: int
    num_layers: int
    dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bound = 1.0 / math.sqrt(self.dim)
        uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)  # noqa: E731
        kernel = self.param("kernel", uniform, (self.num_layers, self.dim, self.features))
        bias = self.param("bias", uniform, (self.num_layers, 1, self.features))
        return jnp.einsum("lbd,ldc->lbc", x, kernel) + bias


def regularizer(name: str, params: PyTree, lasso_weight: float) -> Array:
    """The probe's extra loss term: H2T's group lasso (one group per input feature, as the reference's
    default) times probe.lasso_weight; 0 for the other probes."""
    if name != "h2t" or not lasso_weight:
        return jnp.zeros((), jnp.float32)
    return lasso_weight * group_lasso_penalty(params)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def decay_mask(params: PyTree, regex: str = DEFAULT_DECAY_REGEX) -> PyTree:
    """True for the parameters weight decay applies to: those whose path ("cgp/fc/kernel") matches."""
    pattern = re.compile(regex)
    return jax.tree_util.tree_map_with_path(lambda keys, _: bool(pattern.search(_path(keys))), params)


def lr_at(step: Array, peak_lr: Array, cfg: ml_collections.ConfigDict) -> Array:
    """The learning rate of an update: linear warm-up from end_lr to `peak_lr` over optim.warmup_steps, then
    a cosine decay to end_lr at train.steps (`peak_lr` may be traced: one per sweep member)."""
    end, warmup, total = float(cfg.optim.end_lr), int(cfg.optim.warmup_steps), int(cfg.train.steps)
    step = step.astype(jnp.float32)
    warm = end + (peak_lr - end) * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(total - warmup, 1), 0.0, 1.0)
    cosine = end + (peak_lr - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)


def optimizer(cfg: ml_collections.ConfigDict, params: PyTree) -> optax.GradientTransformation:
    """AdamW with the learning rate injected (set per step by `lr_at`) and the decay mask of `params`."""
    regex = cfg.optim.get("decay_regex", DEFAULT_DECAY_REGEX)
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=float(cfg.optim.peak_lr),
        b1=float(cfg.optim.b1),
        b2=float(cfg.optim.b2),
        weight_decay=float(cfg.optim.weight_decay),
        mask=decay_mask(params, regex),
    )


def check_optimizer(cfg: ml_collections.ConfigDict) -> None:
    warmup, steps = int(cfg.optim.warmup_steps), int(cfg.train.steps)
    if steps < 1:
        raise ProbeConfigError(f"train.steps: expected at least 1 update, found {steps}")
    if not 0 <= warmup < steps:
        raise ProbeConfigError(
            f"optim.warmup_steps: expected 0 <= warmup_steps < train.steps = {steps}, found {warmup}"
        )
    try:
        re.compile(cfg.optim.get("decay_regex", DEFAULT_DECAY_REGEX))
    except re.error as e:
        raise ProbeConfigError(
            f"optim.decay_regex: expected a regular expression, found an error: {e}"
        ) from e


def members(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """The sweep members: every (peak_lr, seed) of train.sweep_lrs × train.sweep_seeds, or the one of
    optim.peak_lr and train.seed when no sweep is asked. Each: {"peak_lr", "seed", "label"}."""
    lrs = _floats(cfg.train.get("sweep_lrs", "")) or [float(cfg.optim.peak_lr)]
    seeds = [int(s) for s in _floats(cfg.train.get("sweep_seeds", ""))] or [int(cfg.train.seed)]
    if any(lr <= 0 for lr in lrs):
        raise ProbeConfigError(f"train.sweep_lrs: expected learning rates > 0, found {lrs}")
    sweep = len(lrs) * len(seeds) > 1
    out = []
    for lr in lrs:
        for seed in seeds:
            label = f"lr={lr:g},seed={seed}" if sweep else ""
            out.append({"peak_lr": lr, "seed": seed, "label": label})
    return out


def _floats(value: Any) -> list[float]:
    if value in (None, ""):
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        return [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise ProbeConfigError(f"expected comma-separated numbers, found {value!r}") from None


def member_key(name: str, label: str) -> str:
    """The metrics.json / gates.json key of a probe in a sweep member: "cgp" or "cgp@lr=0.001,seed=0"."""
    return f"{name}@{label}" if label else name


def gated(names: Mapping[str, Any] | Sequence[str]) -> list[str]:
    return [n for n in names if n in GATED]
