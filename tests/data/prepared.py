"""Helpers of the `bat-jax prepare` tests: a sine .wav, the command on one worker, a split's records."""

import json
from pathlib import Path

import numpy as np
import soundfile as sf
from array_record.python.array_record_module import ArrayRecordReader

from bat_jax.cli import main
from bat_jax.data import records

SR = 16000


def wav(path: Path, seconds: float = 0.3, freq: float = 440.0) -> Path:
    t = np.arange(round(seconds * SR)) / SR
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, subtype="PCM_16")
    return path


def run_cli(*args) -> int:
    return main(["prepare", *map(str, args), "--workers", "1", "--no-progress"])


def read_split(out: Path, split: str = "train") -> tuple[dict, list[dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    clips = []
    for shard in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(out / shard["path"]))
        clips += [records.decode(r) for r in reader.read_all()]
        reader.close()
    return manifest, clips
