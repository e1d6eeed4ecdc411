"""Frame-wise sound-event targets: a clip's events (bat_jax.data.records `events`) -> one multi-hot row per
time patch of the encoder, and the front-end's hop in seconds that places the patches in time.

Time patch t of a spectrogram cropped from frame 0 spans frames [t P, (t + 1) P) (P = patch_frames); its
centre is at (t + 0.5) P hop seconds (BAT: P = 16, hop = 10 ms, a token every 160 ms, as the DCASE 2016
task 2 probe assigns targets). Target [t, c] is 1 iff an event of class c is active at that centre:
onset <= centre < offset. Numpy only (the loaders' worker processes call it per clip).
"""

from __future__ import annotations

import math

import numpy as np


def frame_targets(
    event_times: np.ndarray,
    event_classes: np.ndarray,
    num_classes: int,
    num_patches: int,
    patch_frames: int,
    hop_seconds: float,
) -> np.ndarray:
    """Events (event_times [k, 2] onset/offset seconds, event_classes [k]) -> float32 [num_patches,
    num_classes], [t, c] = 1 iff some event of class c has onset <= (t + 0.5) * patch_frames * hop_seconds
    < offset.

    Centres and times are compared in float32, the records' dtype of event times, so an onset written as a
    centre's decimal (0.08, 0.24...) counts at that centre and an offset written so does not."""
    times = np.asarray(event_times, np.float32).reshape(-1, 2)  # [k, 2]
    classes = np.asarray(event_classes).reshape(-1)  # [k]
    if classes.shape[0] != times.shape[0]:
        raise ValueError(
            f"frame_targets: expected one class per event, found {times.shape[0]} events and "
            f"{classes.shape[0]} classes"
        )
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(
            f"frame_targets: expected event classes in [0, {num_classes}), found {classes.tolist()}"
        )
    centres = ((np.arange(num_patches) + 0.5) * patch_frames * hop_seconds).astype(np.float32)  # [T_p]
    active = (times[None, :, 0] <= centres[:, None]) & (centres[:, None] < times[None, :, 1])  # [T_p, k]
    patch, event = np.nonzero(active)
    out = np.zeros((num_patches, num_classes), np.float32)  # [T_p, C]
    out[patch, classes[event]] = 1.0
    return out


def hop_seconds(manifest: dict) -> float:
    """The seconds between two spectrogram frames of a prepared folder, from its manifest's front-end:
    hop_length / sample_rate (bat), the frame shift (kaldi: int(sample_rate * frame_shift_ms / 1000)
    samples, as `bat-jax prepare` frames it)."""
    frontend = manifest.get("frontend") if isinstance(manifest, dict) else None
    params = frontend.get("params") if isinstance(frontend, dict) else None
    if not isinstance(params, dict):
        raise ValueError(
            f"hop_seconds: expected a manifest with frontend.params (a `bat-jax prepare` manifest.json), "
            f"found frontend {frontend!r}"
        )
    name = frontend.get("name")
    keys = {"bat": ("hop_length", "sample_rate"), "kaldi": ("frame_shift_ms", "sample_rate")}
    if name not in keys:
        raise ValueError(f"hop_seconds: expected front-end 'bat' or 'kaldi' in the manifest, found {name!r}")
    missing = [k for k in keys[name] if k not in params]
    if missing:
        raise ValueError(
            f"hop_seconds: expected frontend.params {list(keys[name])} for the {name} front-end, found "
            f"{sorted(params)} without {missing}"
        )
    rate = float(params["sample_rate"])
    hop = params["hop_length"] if name == "bat" else int(rate * params["frame_shift_ms"] * 0.001)
    seconds = hop / rate if rate > 0 else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"hop_seconds: expected a positive hop and sample rate, found {params!r}")
    return float(seconds)
