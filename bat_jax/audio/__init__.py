"""Audio: loading, the BAT and legacy Kaldi front-ends, and the synthetic default dataset."""

from bat_jax.audio import synthetic
from bat_jax.audio.frontend import kaldi_fbank, logmel, normalize_fbank
from bat_jax.audio.io import load

__all__ = ["load", "logmel", "kaldi_fbank", "normalize_fbank", "synthetic"]
