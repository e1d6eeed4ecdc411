"""bat-jax: BAT (Better Audio Transformer) and CGP (Convex Gated Probing) in JAX/Flax."""

from bat_jax import audio

__version__ = "0.1.0"
__all__ = ["audio", "__version__"]
