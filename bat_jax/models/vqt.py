"""VQT (visual query tuning): the probe baseline that runs the frozen encoder itself, with learnable
query tokens prepended at every block (PAPER.md §1.5).

At block l, Q fresh learnable tokens ``query_tokens[l]`` are prepended to the block's input; their queries
attend to the keys and values of the CLS and patch tokens only (no token attends to them), so the frozen
encoder's own outputs are exactly unchanged. Each block's Q query outputs are read after that block and
dropped from the sequence; the next block gets its own fresh tokens. The head: the final CLS token and each
layer's Q query outputs (averaged over chunks, like the CLS), L2-normalised, concatenated, (dropout,) linear.

Usage (the encoder's parameters are an argument, never trained: they go through `jax.lax.stop_gradient`)::

    enc = load_encoder(path)                                   # FrozenEncoder: .config, .params
    probe = make_vqt_probe(num_classes=527, encoder=enc.config)
    params = init_vqt_params(probe, jax.random.key(0))          # {"query_tokens", "fc"} (boxed)
    logits = vqt_logits(probe, nn.unbox(params), enc.params, spec)                   # eval
    logits = vqt_logits(probe, p, enc.params, spec, deterministic=False, rng=key)    # training

Training backpropagates through the whole encoder (to the query tokens): set a remat policy on the
config (``enc.config.replace(remat_policy="dots_saveable")``, same parameters) to save memory. The
optimizer should not decay ``query_tokens`` (reference: ``no_decay_names`` includes 'vqt').

What the reference does (github.com/houtan-ghaffari/BAT_ICML2026 @ 34632af, models/vit.py), which this
module follows:
* Attention.forward L100-105: k, v = k[:, :, num_vqt:], v[:, :, num_vqt:] — every token's query (the
  query tokens' included) attends to the non-query tokens only; the gate reads the full block input.
* EncoderBlock.forward_norm_last L150-162 (/ _first L164-176): the query tokens go through the whole block
  with the other tokens: attention, residual, norm1, MLP, residual, norm2 (in pre-norm blocks: norm1 and
  norm2 before attention and MLP). They are prepended after `pre_norm` (L377-380), which they skip.
* ViT.__init__ L251-264: vqt parameter [depth, num_vqt, dim], init U(-a, a), a = √(6 / (3·patch_area + dim))
  (0.0625 for ViT-B/16); head = Linear(depth·num_vqt·dim + dim, num_classes) with torch's default init —
  optionally LayerNorm first (head_norm, false in the VQT configs); head_dropout is NOT applied to VQT
  features (the configs' head_dropout 0.2 is unused), hence `dropout_rate` defaults to 0 here. The query
  dropout `vqt_dropout` (before each block) defaults to 0 and is never set by models/builder.py: left out.
* configs/*/*_vqt_config.yaml: num_vqt 10; yaml_config.py L201: VQT refused for the SED task.
* ViT.extract_vqt_features L376-399: queries are fresh per block (``self.vqt[i]``, L379), each block's query
  outputs are kept (L382) and removed before the next block (L383); the final CLS is the last block's
  (L385). Both are averaged over 64-time-patch chunks (L388-389); each layer's Q·D query outputs are
  flattened and L2-normalised as ONE vector per layer (L390-394, not per token), the CLS over D; features
  are [CLS, layer 0 queries, layer 1 queries, ...] (L396-399).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bat_jax.models.config import EncoderConfig
from bat_jax.models.encoder import BatEncoder, EncoderOutput
from bat_jax.models.layers import ACT_TOKENS
from bat_jax.models.probes import _Probe, l2_normalize

Array = jax.Array
PyTree = Any

_WHERE = "bat_jax/models/vqt.py"
NUM_QUERIES = 10  # query tokens per block (the reference configs' num_vqt)
QUERY_PARAM = "query_tokens"  # the parameter's name, for optimizer masks (no weight decay)
AXES_QUERIES = ("layers", None, "embed")  # logical axis names of query_tokens [L, Q, D]


def query_init_bound(config: EncoderConfig) -> float:
    """a of the query tokens' U(−a, a) init: √(6 / (3·patch_area + D)) (the reference's VPT-style bound)."""
    area = config.patch_size[0] * config.patch_size[1]
    return math.sqrt(6.0 / float(3 * area + config.dim))


def _uniform(bound: float):
    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# ----------------------------------------------------------------------------------------------------
# The encoder with query tokens (a method for BatEncoder.apply: it reuses the encoder's own submodules)


def _encode_chunk(enc: BatEncoder, tokens: Array, queries: Array) -> tuple[EncoderOutput, Array]:
    """One chunk's patch tokens [b, t, F', D] and queries [L, Q, D] → (cls [L, b, D], patches
    [L, b, t, F', D]) as `BatEncoder.encode_chunk`, and the query outputs [L, b, Q, D]."""
    b, t, f, d = tokens.shape
    x = tokens.reshape(b, t * f, d) + enc.positions(t * f)  # time-major, as the encoder
    cls = jnp.broadcast_to(enc.cls_token.astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1)  # [b, 1 + N, D]
    if enc.config.pre_norm:
        x = enc.pre_norm(x)  # the query tokens skip pre_norm (prepended at the blocks)
    x = nn.with_logical_constraint(x, ACT_TOKENS)
    num_queries = queries.shape[1]
    hidden, query_out = [], []
    for layer, block in enumerate(enc.blocks):
        prefix = jnp.broadcast_to(queries[layer].astype(x.dtype), (b, num_queries, d))  # fresh per block
        y = block(x, None, prefix)  # [b, Q + 1 + N, D]; keys/values: the 1 + N tokens only
        query_out.append(y[:, :num_queries])
        x = y[:, num_queries:]
        hidden.append(x)
    hidden = jnp.stack(hidden)  # [L, b, 1 + N, D]
    out = EncoderOutput(hidden[:, :, 0], hidden[:, :, 1:].reshape(-1, b, t, f, d))
    return out, jnp.stack(query_out)  # [L, b, Q, D]


def _encode_with_queries(enc: BatEncoder, spec: Array, queries: Array) -> tuple[EncoderOutput, Array]:
    """`BatEncoder.__call__` (same chunking: equal chunks folded into the batch, a shorter last one on its
    own, CLS averaged over chunks) with query tokens at every block; query outputs averaged as the CLS."""
    tokens = enc.embed_patches(spec)  # [B, T', F', D]
    batch, time, freq, dim = tokens.shape
    chunk = enc.config.chunk_time_patches
    n_full, rest = divmod(time, chunk)
    cls_sum = query_sum = None
    patch_parts = []
    if n_full:
        full = tokens[:, : n_full * chunk].reshape(batch * n_full, chunk, freq, dim)
        out, q = _encode_chunk(enc, full, queries)
        cls_sum = out.cls.reshape(-1, batch, n_full, dim).sum(axis=2)  # [L, B, D]
        query_sum = q.reshape(q.shape[0], batch, n_full, *q.shape[2:]).sum(axis=2)  # [L, B, Q, D]
        patch_parts.append(out.patches.reshape(-1, batch, n_full * chunk, freq, dim))
    if rest:
        out, q = _encode_chunk(enc, tokens[:, n_full * chunk :], queries)
        cls_sum = out.cls if cls_sum is None else cls_sum + out.cls
        query_sum = q if query_sum is None else query_sum + q
        patch_parts.append(out.patches)
    chunks = n_full + (rest > 0)
    patches = patch_parts[0] if len(patch_parts) == 1 else jnp.concatenate(patch_parts, axis=2)
    return EncoderOutput(cls_sum / chunks, patches), query_sum / chunks


def encode_with_queries(
    config: EncoderConfig, encoder_params: PyTree, spec: Array, queries: Array
) -> tuple[EncoderOutput, Array]:
    """The frozen encoder's forward with query tokens ``queries`` [L, Q, D] prepended at every block.

    Returns (EncoderOutput(cls [L, B, D], patches [L, B, T', F', D]) — equal to the plain encoder's — and
    the query outputs [L, B, Q, D], averaged over chunks). Differentiable in everything (no stop_gradient
    here; `VQTProbe` stops the encoder's gradient).
    """
    if queries.ndim != 3 or queries.shape[0] != config.depth or queries.shape[2] != config.dim:
        raise ValueError(
            f"encode_with_queries ({_WHERE}): queries must be [L={config.depth}, Q, D={config.dim}], "
            f"got shape {tuple(queries.shape)}"
        )
    spec = jnp.asarray(spec).astype(jnp.dtype(config.dtype))
    encoder = BatEncoder(config, parent=None)  # a top-level module, also when called inside a probe
    return encoder.apply({"params": encoder_params}, spec, queries, method=_encode_with_queries)


# ----------------------------------------------------------------------------------------------------
# The probe


def _refuse_frame_wise(where: str) -> None:
    raise ValueError(
        f"{where} ({_WHERE}): VQT gives clip-level logits [B, C] only; it does not work for frame-wise "
        "tasks (sound event detection; the reference refuses it too). Use cgp_frame, lp/lcgp/h2t with "
        "pooling='frame', or protobin with frame_wise=True."
    )


class VQTProbe(_Probe):
    """VQT: `num_queries` learnable tokens per block run through the frozen encoder (see the module
    docstring); features [final CLS (D), then per layer its Q·D query outputs], each part L2-normalised
    (when `normalize`), optional LayerNorm (`use_norm`), dropout, linear → logits [B, C] (float32).

    ``__call__(spec [B, T, n_mels], encoder_params, *, deterministic=True)``; `encoder` is the frozen
    encoder's config (num_layers and dim must match it: `make_vqt_probe` fills them in). Parameters:
    ``query_tokens`` [L, Q, D] and ``fc`` (``ln`` with use_norm).
    """

    dropout_rate: float = 0.0  # the reference applies no dropout to the VQT features (module docstring)
    encoder: EncoderConfig | None = None
    num_queries: int = NUM_QUERIES
    normalize: bool = True
    use_norm: bool = False  # LayerNorm over the features before the linear layer (the reference's head_norm)
    norm_eps: float = 1e-6
    frame_wise: bool = False  # not supported: raises

    def _check(self) -> EncoderConfig:
        if self.frame_wise:
            _refuse_frame_wise("VQTProbe")
        cfg = self.encoder
        if cfg is None:
            raise ValueError(f"VQTProbe ({_WHERE}): needs encoder=<the frozen encoder's EncoderConfig>")
        if (self.num_layers, self.dim) != (cfg.depth, cfg.dim):
            raise ValueError(
                f"VQTProbe ({_WHERE}): num_layers={self.num_layers}, dim={self.dim} do not match the "
                f"encoder (depth {cfg.depth}, dim {cfg.dim})"
            )
        if self.num_queries <= 0:
            raise ValueError(f"VQTProbe ({_WHERE}): num_queries must be positive, got {self.num_queries}")
        return cfg

    @nn.compact
    def __call__(self, spec: Array, encoder_params: PyTree | None, *, deterministic: bool = True) -> Array:
        cfg = self._check()
        queries = self.param(
            QUERY_PARAM,
            nn.with_logical_partitioning(_uniform(query_init_bound(cfg)), AXES_QUERIES),
            (cfg.depth, self.num_queries, cfg.dim),
            self.param_dtype,
        )  # [L, Q, D]
        if encoder_params is None and self.is_initializing():  # `init_vqt_params`: shapes only
            batch = spec.shape[0]
            cls = jnp.zeros((batch, cfg.dim), self.dtype)
            q = jnp.zeros((cfg.depth, batch, self.num_queries, cfg.dim), self.dtype)
        else:
            frozen = jax.lax.stop_gradient(encoder_params)  # the encoder is never trained
            out, q = encode_with_queries(cfg, frozen, spec, queries)  # cls [L, B, D], q [L, B, Q, D]
            cls = jnp.asarray(out.cls[-1], self.dtype)  # [B, D]: the final CLS
        q = jnp.moveaxis(jnp.asarray(q, self.dtype), 0, 1)  # [B, L, Q, D]
        q = q.reshape(q.shape[0], cfg.depth, self.num_queries * cfg.dim)  # [B, L, Q·D]
        if self.normalize:
            cls, q = l2_normalize(cls), l2_normalize(q)  # q: one vector per layer
        feats = jnp.concatenate([cls, q.reshape(q.shape[0], -1)], axis=-1)  # [B, D + L·Q·D]
        return self._classify(self._norm(feats, self.use_norm, self.norm_eps), deterministic)

    def query_outputs(self, spec: Array, encoder_params: PyTree) -> tuple[EncoderOutput, Array]:
        """(EncoderOutput, raw query outputs [L, B, Q, D]) with this probe's query tokens (bound module:
        ``probe.apply({"params": p}, spec, enc_params, method=VQTProbe.query_outputs)``)."""
        cfg = self._check()
        queries = self.get_variable("params", QUERY_PARAM)
        return encode_with_queries(cfg, jax.lax.stop_gradient(encoder_params), spec, nn.unbox(queries))


def make_vqt_probe(num_classes: int, encoder: EncoderConfig, **kw: Any) -> VQTProbe:
    """A VQT probe for the frozen encoder of config `encoder` (num_layers and dim taken from it).

    Keyword arguments set fields: num_queries (10), dropout_rate (0.0), normalize, use_norm, norm_eps,
    dtype, param_dtype, precision. ``frame_wise=True`` raises ValueError (VQT is clip-level only).
    """
    if kw.get("frame_wise") or kw.get("pooling") == "frame":
        _refuse_frame_wise("make_vqt_probe")
    fields = set(VQTProbe.__dataclass_fields__) - {"parent", "name", "num_layers", "dim", "encoder"}
    unknown = sorted(set(kw) - fields)
    if unknown:
        raise TypeError(
            f"make_vqt_probe ({_WHERE}): VQTProbe has no field(s) {unknown}; fields: {sorted(fields)}"
        )
    return VQTProbe(num_classes=num_classes, num_layers=encoder.depth, dim=encoder.dim, encoder=encoder, **kw)


def init_vqt_params(probe: VQTProbe, rng: Array) -> dict[str, Any]:
    """Fresh parameters {"query_tokens": [L, Q, D], "fc": {...}} (boxed with logical axis names, as
    `probes.init_params`; `nn.unbox` gives plain arrays). Needs no encoder weights and runs no encoder."""
    cfg = probe._check()
    spec = jnp.zeros((1, cfg.patch_size[0], cfg.n_mels), jnp.dtype(cfg.dtype))  # one time patch

    def init(key: Array) -> dict[str, Any]:
        return probe.init(key, spec, None)["params"]

    return jax.jit(init)(rng)


def vqt_param_logical_axes(probe: VQTProbe) -> dict[str, Any]:
    """PartitionSpec of logical axis names for every VQT parameter (nothing allocated)."""
    return nn.get_partition_spec(jax.eval_shape(lambda k: init_vqt_params(probe, k), jax.random.key(0)))


def vqt_logits(
    probe: VQTProbe,
    probe_params: PyTree,
    encoder_params: PyTree,
    spec: Array,
    *,
    deterministic: bool = True,
    rng: Array | None = None,
) -> Array:
    """Logits [B, C] (float32) of spec [B, T, n_mels]; jit-friendly (call it inside the jitted step).

    `probe_params`: the probe's params (plain or boxed, with or without the {"params": ...} level);
    `encoder_params`: the frozen encoder's plain params (`FrozenEncoder.params`), gradient stopped.
    Training (`deterministic=False`) with dropout needs `rng` (the dropout key).
    """
    if not deterministic and probe.dropout_rate > 0 and rng is None:
        raise ValueError(f"vqt_logits ({_WHERE}): deterministic=False with dropout needs rng")
    params = probe_params["params"] if "params" in probe_params else probe_params
    rngs = {"dropout": rng} if rng is not None and not deterministic else None
    return probe.apply({"params": params}, spec, encoder_params, deterministic=deterministic, rngs=rngs)
