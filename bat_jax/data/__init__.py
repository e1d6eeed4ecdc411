"""Spectrogram shards, the `prepare` command and the Grain input pipelines."""

from bat_jax.data.events import frame_targets, hop_seconds

__all__ = ["frame_targets", "hop_seconds"]
