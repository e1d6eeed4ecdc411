"""bat_jax.models: the encoder (and, beside it, decoder, masking, SSL objective, probes)."""

from bat_jax.models.config import EncoderConfig, bat_base, bat_small, eat_base, tiny
from bat_jax.models.encoder import BatEncoder, EncoderOutput, FrozenEncoder, init_params, logical_axes, unbox

__all__ = [
    "BatEncoder",
    "FrozenEncoder",
    "EncoderConfig",
    "EncoderOutput",
    "bat_base",
    "bat_small",
    "eat_base",
    "init_params",
    "logical_axes",
    "tiny",
    "unbox",
]
