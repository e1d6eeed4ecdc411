"""Loading audio files as mono float32 waveforms at a fixed sample rate (what BAT's loaders do).

soundfile first (fast; wav, flac, ogg and, with libsndfile >= 1.1, mp3), then librosa/audioread for formats
soundfile lacks. Resampling is librosa's soxr path (`res_type="soxr_hq"` as in the reference).

`load_with_notes` also says what is worth reporting about a file that loads: a truncated WAV (the header
promises more frames than the data holds; libsndfile reads what is there).
"""

import os
import struct
import warnings

import librosa
import numpy as np
import soundfile as sf


class AudioLoadError(ValueError):
    """A file could not be read as audio (missing, unreadable, not audio, or empty)."""


def _read_soundfile(path: str) -> tuple[np.ndarray, int]:
    """[samples, channels] float32 in [-1, 1] and the native rate; raises soundfile's errors."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return data, int(rate)


def _read_fallback(path: str) -> tuple[np.ndarray, int]:
    """[samples, channels] float32 via librosa (audioread backends), for formats libsndfile lacks."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # librosa warns that soundfile failed and audioread is deprecated
        data, rate = librosa.load(path, sr=None, mono=False, dtype=np.float32)
    return np.atleast_2d(data).T, int(rate)


def _read(path: str) -> tuple[np.ndarray, int]:
    try:
        return _read_soundfile(path)
    except Exception as soundfile_error:  # noqa: BLE001 - any soundfile failure means: try the fallback
        try:
            return _read_fallback(path)
        except Exception as fallback_error:  # noqa: BLE001
            reason = str(fallback_error) or "no backend could decode it (ffmpeg adds formats)"
            raise AudioLoadError(
                f"cannot read {path!r} as audio: soundfile said: {soundfile_error}; "
                f"librosa/audioread said: {type(fallback_error).__name__}: {reason}"
            ) from fallback_error


def wav_header_frames(path: str) -> int | None:
    """The frame count a RIFF/WAVE file's header promises (data chunk size // block align), or None when
    the file is not such a WAV or does not say (RF64, streaming size 0xFFFFFFFF, data before fmt)."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:12] != b"WAVE":
            return None
        block_align = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                fmt = f.read(size + (size & 1))
                block_align = struct.unpack("<H", fmt[12:14])[0] if len(fmt) >= 14 else None
            elif name == b"data":
                if not block_align or size == 0xFFFFFFFF:
                    return None
                return size // block_align
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)


def load_with_notes(
    path: str | os.PathLike, sample_rate: int = 16000, *, res_type: str = "soxr_hq"
) -> tuple[np.ndarray, tuple[tuple[str, str], ...]]:
    """`load`, and `notes`: (kind, reason) pairs about a file that loads but is worth reporting.

    kind "truncated": a WAV whose header promises more frames than its data holds; the frames there are
    returned (what soundfile reads), the reason says how many were read and how many the header promises.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AudioLoadError(f"cannot load {path!r}: expected an audio file, found no such file")
    data, native_rate = _read(path)  # [samples, channels]
    if data.size == 0:
        raise AudioLoadError(
            f"cannot load {path!r}: expected at least one sample, found an empty file "
            f"(shape {data.shape}, {native_rate} Hz)"
        )
    notes = []
    try:
        promised = wav_header_frames(path)
    except (OSError, struct.error):  # the data was read; a header we cannot parse says nothing more
        promised = None
    if promised is not None and promised > data.shape[0]:
        missing = promised - data.shape[0]
        notes.append(
            (
                "truncated",
                f"{data.shape[0]} frames read, the WAV header promises {promised} ({missing} missing, "
                f"{missing / native_rate:.3f} s at {native_rate} Hz)",
            )
        )
    wave = data.mean(axis=1, dtype=np.float32)  # [samples]
    if not np.all(np.isfinite(wave)):
        raise AudioLoadError(f"cannot load {path!r}: expected finite samples, found NaN or inf")
    if native_rate != sample_rate:
        wave = librosa.resample(wave, orig_sr=native_rate, target_sr=sample_rate, res_type=res_type)
    return np.ascontiguousarray(wave, dtype=np.float32), tuple(notes)


def load(path: str | os.PathLike, sample_rate: int = 16000, *, res_type: str = "soxr_hq") -> np.ndarray:
    """Read an audio file as a mono float32 waveform [samples] at `sample_rate`.

    Channels are averaged; integer PCM is scaled to [-1, 1]; other rates are resampled with
    librosa.resample(res_type) (soxr_hq by default; BAT uses soxr_vhq for ESC-50 and Speech Commands).
    Raises AudioLoadError, naming the file, when it is missing, not audio, unreadable or empty.
    A truncated WAV gives the frames it holds (`load_with_notes` also says so).
    """
    return load_with_notes(path, sample_rate, res_type=res_type)[0]
