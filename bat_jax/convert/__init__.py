"""Encoder weight import: Hugging Face BAT, BAT .pt, EAT/SSLAM fairseq .pt, and bat-jax checkpoints."""

from bat_jax.convert.checkpoint import save_encoder
from bat_jax.convert.load import load_encoder, load_weights

__all__ = ["load_encoder", "load_weights", "save_encoder"]
