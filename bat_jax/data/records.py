"""The spectrogram shard record: one clip per ArrayRecord record, msgpack-encoded.

A record holds
    features    float16 [frames, n_mels]   the front-end output of the whole clip (or its cut/padded form)
    num_frames  int                        the true number of frames (<= frames; padding follows it)
    clip_id     str                        a stable id (relative path, TFDS key, or synthetic index)
    labels      list[int]                  class indices into the manifest's label vocabulary (multi-label)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Clip:
    features: np.ndarray  # float16 [frames, n_mels]
    num_frames: int
    clip_id: str
    labels: tuple[int, ...] = field(default_factory=tuple)


def encode(clip: Clip) -> bytes:
    feats = np.ascontiguousarray(clip.features, dtype=np.float16)
    if feats.ndim != 2:
        raise ValueError(
            f"clip {clip.clip_id!r}: expected features [frames, n_mels], found shape {feats.shape}"
        )
    if not 0 < clip.num_frames <= feats.shape[0]:
        raise ValueError(
            f"clip {clip.clip_id!r}: num_frames must be in [1, {feats.shape[0]}], found {clip.num_frames}"
        )
    return msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "features": feats.tobytes(),
            "shape": list(feats.shape),
            "num_frames": int(clip.num_frames),
            "clip_id": str(clip.clip_id),
            "labels": [int(x) for x in clip.labels],
        },
        use_bin_type=True,
    )


def decode(record: bytes) -> dict:
    """bytes -> dict: features float16 [frames, n_mels], num_frames int32, clip_id str, labels int32 [k]."""
    d = msgpack.unpackb(record, raw=False)
    if d.get("v") != FORMAT_VERSION:
        raise ValueError(
            f"unknown shard record version {d.get('v')!r}; this bat-jax reads version {FORMAT_VERSION}"
        )
    feats = np.frombuffer(d["features"], dtype=np.float16).reshape(d["shape"])
    return {
        "features": feats,
        "num_frames": np.int32(d["num_frames"]),
        "clip_id": d["clip_id"],
        "labels": np.asarray(d["labels"], dtype=np.int32),
    }
