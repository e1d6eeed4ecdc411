"""Everything that reads foreign (PyTorch / Hugging Face) layouts into bat-jax params.

Encoders: Hugging Face BAT, BAT .pt, EAT/SSLAM fairseq .pt and bat-jax checkpoints (`load_encoder`,
`load_weights`, `save_encoder`); the reference SSL student and decoder (`ssl_params_from_reference`,
`decoder_params_from_reference`); the reference probe heads (`probe_params_from_reference`); the HF
`config.json` (`encoder_config_from_hf`). Every import error is a `CheckpointError` (a ValueError) naming
the file and the reason. `bat_jax.models` never imports this package.
"""

from bat_jax.convert.checkpoint import save_encoder
from bat_jax.convert.errors import CheckpointError
from bat_jax.convert.hf import encoder_config_from_hf
from bat_jax.convert.load import load_encoder, load_weights
from bat_jax.convert.probes import probe_params_from_reference
from bat_jax.convert.ssl import decoder_params_from_reference, ssl_params_from_reference

__all__ = [
    "CheckpointError",
    "decoder_params_from_reference",
    "encoder_config_from_hf",
    "load_encoder",
    "load_weights",
    "probe_params_from_reference",
    "save_encoder",
    "ssl_params_from_reference",
]
