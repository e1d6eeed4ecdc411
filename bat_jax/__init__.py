"""bat-jax: BAT (Better Audio Transformer) and CGP (Convex Gated Probing) in JAX/Flax."""

from bat_jax import audio
from bat_jax.convert import load_encoder

__version__ = "0.1.0"
__all__ = ["audio", "load_encoder", "__version__"]
