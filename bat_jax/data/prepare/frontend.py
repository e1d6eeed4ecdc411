"""The front-end as `prepare` runs it: a picklable Frontend with all its parameters, clip cutting/padding, and
length bucketing.

A clip of T frames is computed on a waveform zero-padded to a multiple of `bucket_frames` frames, so jit
compiles once per bucket, not once per clip length, and the frames past T are dropped. The BAT front-end's dB
floor and min-max run over the T valid frames only, so the result equals `bat_jax.audio.logmel` on the
unpadded clip (tests check it).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from bat_jax.data import sources

SAMPLE_RATE = sources.SAMPLE_RATE
BUCKET_FRAMES = 128  # front-end inputs are padded to a multiple of this many frames (one jit per bucket)


_PER_CALL = ("num_valid_frames",)  # front-end arguments set per clip, not settings of the dataset


def _defaults(fn) -> dict[str, Any]:
    """Keyword defaults of a front-end function: its full parameter set."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in _PER_CALL
    }


FRONTENDS = {
    "bat": {
        "function": "bat_jax.audio.logmel",
        "normalization": "per-clip: dB with a top_db floor, then min-max to [0, 1] (applied here)",
    },
    "kaldi": {
        "function": "bat_jax.audio.kaldi_fbank",
        "normalization": (
            "none: raw Kaldi log-mel; the dataset normalisation (x - mean) / (2 std) is applied later "
            "(bat_jax.audio.normalize_fbank, bat_jax.audio.frontend.FBANK_STATS)"
        ),
    },
}


@dataclass(frozen=True)
class Frontend:
    """A front-end with all its parameters, the clip handling and the jit bucket size (picklable)."""

    name: str
    params: tuple[tuple[str, Any], ...]
    clip_seconds: float | None = None
    bucket_frames: int = BUCKET_FRAMES

    @classmethod
    def create(
        cls, name: str, clip_seconds: float | None = None, bucket_frames: int = BUCKET_FRAMES, **overrides
    ):
        from bat_jax.audio import frontend as fe

        if name not in FRONTENDS:
            raise ValueError(f"--frontend: expected one of {sorted(FRONTENDS)}, found {name!r}")
        params = _defaults(fe.logmel if name == "bat" else fe.kaldi_fbank)
        unknown = set(overrides) - set(params)
        if unknown:
            raise ValueError(
                f"front-end {name!r}: unknown parameters {sorted(unknown)}; known: {sorted(params)}"
            )
        params.update(overrides)
        if name == "kaldi" and not params["remove_mean"]:
            raise ValueError("front-end 'kaldi': remove_mean=False is not supported by prepare")
        frontend = cls(name, tuple(sorted(params.items())), clip_seconds, bucket_frames)
        if frontend.sample_rate != SAMPLE_RATE:
            raise ValueError(
                f"front-end {name!r}: expected sample_rate {SAMPLE_RATE}, found {frontend.sample_rate}"
            )
        if clip_seconds is not None and frontend.clip_samples < frontend.min_samples:
            raise ValueError(
                f"--clip-seconds: expected at least {frontend.min_samples / SAMPLE_RATE} s for the {name} "
                f"front-end, found {clip_seconds}"
            )
        return frontend

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def sample_rate(self) -> int:
        return int(self.kwargs["sample_rate"])

    @property
    def n_mels(self) -> int:
        p = self.kwargs
        return int(p["n_mels"] if self.name == "bat" else p["num_mel_bins"])

    def _window_and_hop(self) -> tuple[int, int]:
        """(samples per frame, hop in samples)."""
        p = self.kwargs
        if self.name == "bat":
            return int(p["n_fft"]), int(p["hop_length"])
        return int(p["sample_rate"] * p["frame_length_ms"] * 0.001), int(
            p["sample_rate"] * p["frame_shift_ms"] * 0.001
        )

    @property
    def min_samples(self) -> int:
        window, _ = self._window_and_hop()
        return window // 2 + 1 if self.name == "bat" else window  # bat: reflect padding needs > n_fft // 2

    def frames(self, samples: int) -> int:
        """Frames the front-end makes of `samples` samples (bat: centred frames; kaldi: snip_edges)."""
        window, hop = self._window_and_hop()
        return samples // hop + 1 if self.name == "bat" else 1 + (samples - window) // hop

    @property
    def clip_samples(self) -> int | None:
        return None if self.clip_seconds is None else round(self.clip_seconds * self.sample_rate)

    @property
    def fixed_frames(self) -> int | None:
        return None if self.clip_seconds is None else self.frames(self.clip_samples)

    def describe(self) -> dict:
        return {"name": self.name, **FRONTENDS[self.name], "params": self.kwargs}

    def describe_clip(self) -> dict:
        if self.clip_seconds is None:
            return {"mode": "full", "description": "every clip at its full length; num_frames = frames"}
        return {
            "mode": "fixed",
            "seconds": self.clip_seconds,
            "samples": self.clip_samples,
            "frames": self.fixed_frames,
            "description": (
                f"clips longer than {self.clip_seconds} s are cut to their first {self.clip_samples} samples "
                "before the front-end; the features of shorter clips are zero-padded to "
                f"{self.fixed_frames} frames after the front-end (after normalisation); num_frames is the "
                "true number of frames"
            ),
        }

    def _bucket(self, frames: int) -> int:
        return math.ceil(frames / self.bucket_frames) * self.bucket_frames

    def compute(self, wave: np.ndarray) -> np.ndarray:
        """float32 [samples] -> float32 [frames(samples), n_mels], through one jit per length bucket."""
        from bat_jax.audio.frontend import kaldi_fbank, logmel

        p = self.kwargs
        window, hop = self._window_and_hop()
        frames = self.frames(wave.shape[0])
        if self.name == "bat":
            # the clip, its end reflected as logmel's centring would (so frames [:T] see the same samples),
            # then zeros up to a length fixed by the bucket: [bucket * hop + n_fft // 2]
            pad = window // 2
            need = self._bucket(frames) * hop + pad  # > samples + pad, since bucket * hop > samples
            tail = np.pad(wave, (0, pad), mode="reflect")  # [samples + pad]
            padded = np.pad(tail, (0, need - tail.shape[0]))
            out = logmel(padded, **p, num_valid_frames=np.int32(frames))  # [need // hop + 1, n_mels]
        else:
            need = (self._bucket(frames) - 1) * hop + window  # samples that make exactly the bucket's frames
            centred = (wave - wave.mean(dtype=np.float64)).astype(np.float32)  # the mean of the true samples
            padded = np.pad(centred[:need], (0, max(0, need - centred.shape[0])))
            out = kaldi_fbank(padded, **{**p, "remove_mean": False})
        return np.asarray(out)[:frames]

    def __call__(self, wave: np.ndarray) -> tuple[np.ndarray, int]:
        """float32 [samples] (already cut) -> (float16 [frames or fixed_frames, n_mels], true frames)."""
        features = self.compute(wave)  # [T, n_mels]
        frames = features.shape[0]
        if self.fixed_frames is not None and frames < self.fixed_frames:
            features = np.pad(features, ((0, self.fixed_frames - frames), (0, 0)))
        return features.astype(np.float16), frames
