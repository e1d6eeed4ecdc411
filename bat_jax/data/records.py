"""The spectrogram shard record: one clip per ArrayRecord record, msgpack-encoded.

A record holds
    spec        float16 [frames, n_mels]   the front-end output of the whole clip (or its cut/padded form)
    num_frames  int                        the true number of frames (<= frames; padding follows it)
    clip_id     str                        a stable id (relative path, TFDS key, or synthetic index)
    labels      list[int]                  class indices into the manifest's label vocabulary (multi-label)
    fold        int | str, optional        the clip's cross-validation fold (`bat-jax prepare --fold-column`);
                                           absent from records written without one
    events      list[[onset, offset, class]], optional
                                           the clip's sound events (`bat-jax prepare --events-csv` or
                                           `--synthetic-events`): seconds from the clip's start, 0 <= onset <
                                           offset, class an index into the label vocabulary; [] for an
                                           annotated clip without events; absent from records without
                                           annotations

The spectrogram is called `spec` everywhere: in a record, in a `Clip`, in `decode`'s dict and in a loader's
batch. Version 1 records (bat-jax before issue 6) stored it under the key "features"; `decode` still reads
them, `encode` writes version 2. `fold` is an optional key of version 2 (added with issue 8, no version
bump): `encode` writes it only for a clip that has a fold, so other records stay byte-identical, and `decode`
returns it only when the record holds one (readers older than it ignore the key). Loaders that need every
clip's fold without decoding records read it from the manifest: `splits.<split>.folds.by_record`.
`events` is optional the same way (added with the frame-wise targets of sound-event detection, no version
bump): written only for a clip that has event annotations (an empty list: annotated, no event), so records
without them stay byte-identical; `decode` returns them, only when the record holds them, as `event_times`
float32 [k, 2] (onset, offset in seconds) and `event_classes` int32 [k].
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import msgpack
import numpy as np

FORMAT_VERSION = 2
# Record version -> the msgpack key that holds the spectrogram bytes.
SPEC_KEY = {1: "features", 2: "spec"}
_FIELDS = ("shape", "num_frames", "clip_id", "labels")


@dataclass(frozen=True)
class Clip:
    spec: np.ndarray  # float16 [frames, n_mels]
    num_frames: int
    clip_id: str
    labels: tuple[int, ...] = field(default_factory=tuple)
    fold: int | str | None = None
    events: tuple[tuple[float, float, int], ...] | None = None  # (onset s, offset s, class) or None


def _check_fold(fold, where: str):
    if fold is None or (isinstance(fold, int | str) and not isinstance(fold, bool)):
        return fold
    raise ValueError(
        f"{where}: expected a fold that is an int or a str, found {type(fold).__name__} {fold!r}"
    )


def _check_events(events, where: str) -> list[list] | None:
    """Events as (onset, offset, class) triples -> [[onset float, offset float, class int], ...], or None.

    Raises ValueError, naming `where`, unless 0 <= onset < offset (finite seconds), class an int >= 0."""
    if events is None:
        return None
    if isinstance(events, str | bytes | dict) or not hasattr(events, "__iter__"):
        raise ValueError(
            f"{where}: expected events as a sequence of (onset, offset, class), found {type(events).__name__}"
        )
    out = []
    for i, event in enumerate(events):
        try:
            onset, offset, cls = event
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: event {i}: expected (onset, offset, class), found {event!r}"
            ) from None
        real = all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in (onset, offset))
        if not (real and math.isfinite(onset) and math.isfinite(offset) and 0 <= onset < offset):
            raise ValueError(
                f"{where}: event {i}: expected seconds with 0 <= onset < offset, found onset {onset!r} and "
                f"offset {offset!r}"
            )
        if not isinstance(cls, numbers.Integral) or isinstance(cls, bool) or cls < 0:
            raise ValueError(f"{where}: event {i}: expected a class index that is an int >= 0, found {cls!r}")
        out.append([float(onset), float(offset), int(cls)])
    return out


def encode(clip: Clip) -> bytes:
    spec = np.ascontiguousarray(clip.spec, dtype=np.float16)
    if spec.ndim != 2:
        raise ValueError(f"clip {clip.clip_id!r}: expected spec [frames, n_mels], found shape {spec.shape}")
    if not 0 < clip.num_frames <= spec.shape[0]:
        raise ValueError(
            f"clip {clip.clip_id!r}: num_frames must be in [1, {spec.shape[0]}], found {clip.num_frames}"
        )
    fold = _check_fold(clip.fold, f"clip {clip.clip_id!r}")
    events = _check_events(clip.events, f"clip {clip.clip_id!r}")
    record = {
        "v": FORMAT_VERSION,
        "spec": spec.tobytes(),
        "shape": list(spec.shape),
        "num_frames": int(clip.num_frames),
        "clip_id": str(clip.clip_id),
        "labels": [int(x) for x in clip.labels],
    }
    if fold is not None:
        record["fold"] = fold
    if events is not None:
        record["events"] = events
    return msgpack.packb(record, use_bin_type=True)


def decode(record: bytes) -> dict:
    """bytes -> dict: spec float16 [frames, n_mels], num_frames int32, clip_id str, labels int32 [k],
    fold (int or str) only when the record has one, and event_times float32 [e, 2] (onset, offset seconds)
    with event_classes int32 [e] only when the record has events.

    Reads versions 1 and 2. Raises ValueError, saying what was expected and found, on bytes that are not a
    record (not msgpack, not a map, a missing key, a spectrogram whose size does not match its shape)."""
    try:
        d = msgpack.unpackb(record, raw=False)
    except Exception as e:  # msgpack raises several unrelated types (ExtraData, FormatError, ValueError, ...)
        raise ValueError(
            f"expected a msgpack shard record, found undecodable bytes ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(d, dict):
        raise ValueError(f"expected a msgpack map as shard record, found a {type(d).__name__}")
    version = d.get("v")
    if version not in SPEC_KEY:
        raise ValueError(
            f"unknown shard record version {version!r}; this bat-jax reads versions {sorted(SPEC_KEY)}"
        )
    missing = [key for key in (SPEC_KEY[version], *_FIELDS) if key not in d]
    if missing:
        raise ValueError(f"shard record version {version}: expected keys {missing}, found {sorted(d)}")
    data, shape = d[SPEC_KEY[version]], d["shape"]
    if (
        not isinstance(data, bytes)
        or not isinstance(shape, list)
        or len(shape) != 2
        or not all(isinstance(n, int) and n >= 0 for n in shape)
        or len(data) != 2 * shape[0] * shape[1]
    ):
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise ValueError(
            f"shard record: expected a float16 spectrogram of shape [frames, n_mels], found shape {shape!r} "
            f"with {size} bytes"
        )
    num_frames = d["num_frames"]
    if not isinstance(num_frames, int) or not 0 < num_frames <= shape[0]:
        raise ValueError(
            f"shard record: expected num_frames in [1, {shape[0]}] (the spectrogram's frames), found "
            f"{num_frames!r}"
        )
    out = {
        "spec": np.frombuffer(data, dtype=np.float16).reshape(shape),
        "num_frames": np.int32(num_frames),
        "clip_id": d["clip_id"],
        "labels": np.asarray(d["labels"], dtype=np.int32),
    }
    if d.get("fold") is not None:
        out["fold"] = _check_fold(d["fold"], f"shard record {d['clip_id']!r}")
    if d.get("events") is not None:
        events = _check_events(d["events"], f"shard record {d['clip_id']!r}")
        out["event_times"] = np.asarray([e[:2] for e in events], np.float32).reshape(-1, 2)  # [e, 2]
        out["event_classes"] = np.asarray([e[2] for e in events], np.int32)  # [e]
    return out
