"""Spectrogram shards, the `prepare` command and the Grain input pipelines."""
