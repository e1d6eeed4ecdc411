"""Throughput of the BAT front-end: bat_jax.audio.logmel (jitted, batched) against librosa clip by clip.

Run from the repository root: `python -m benchmarks.frontend [--batch 32] [--seconds 10] [--repeats 5]`.
The librosa side is the reference's recipe (melspectrogram, power_to_db(ref=max, top_db=80), min-max),
one clip at a time as the reference's data loader runs it. The prepare row is `bat-jax prepare`'s
front-end (bat_jax.data.prepare.Frontend: one clip at a time, padded to a 128-frame bucket so jit compiles
once per bucket, as a prepare worker runs it).
"""

import argparse
import os
import platform
import time
from pathlib import Path

import jax
import librosa
import numpy as np

from bat_jax.audio.frontend import logmel

SAMPLE_RATE = 16000
N_FFT = 1024
HOP = 160
N_MELS = 128
TOP_DB = 80.0
EPS = 1e-8


def librosa_logmel(wave: np.ndarray) -> np.ndarray:
    """One clip [samples] -> [frames, mels] in [0, 1], as the reference computes it."""
    power = librosa.feature.melspectrogram(
        y=wave,
        sr=SAMPLE_RATE,
        n_fft=N_FFT,
        hop_length=HOP,
        n_mels=N_MELS,
        htk=True,
        norm=None,
        power=2.0,
        center=True,
        pad_mode="reflect",
    )  # [mels, frames]
    db = librosa.power_to_db(power, ref=np.max, top_db=TOP_DB)
    return ((db - db.min()) / (db.max() - db.min() + EPS)).T


def best_rate(run, clips: int, repeats: int) -> tuple[float, float]:
    """(best, median) clips per second over `repeats` timed calls of `run`."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return clips / min(seconds), clips / float(np.median(seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="clips per batch")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length in seconds")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (best and median reported)")
    args = parser.parse_args()

    samples = int(args.seconds * SAMPLE_RATE)
    rng = np.random.default_rng(0)
    waves = (0.1 * rng.standard_normal((args.batch, samples))).astype(np.float32)  # [B, samples]

    jitted = jax.jit(logmel)
    device_waves = jax.device_put(waves)
    jitted(device_waves).block_until_ready()  # compile + warm-up, not timed
    jax_best, jax_median = best_rate(
        lambda: jitted(device_waves).block_until_ready(), args.batch, args.repeats
    )

    from bat_jax.data import prepare

    bucketed = prepare.Frontend.create("bat")
    bucketed.compute(waves[0])  # compile + warm-up
    prep_best, prep_median = best_rate(lambda: [bucketed.compute(w) for w in waves], args.batch, args.repeats)

    librosa_logmel(waves[0])  # warm-up (filterbank, FFT plans)
    lib_best, lib_median = best_rate(lambda: [librosa_logmel(w) for w in waves], args.batch, args.repeats)

    spread = np.abs(np.asarray(jitted(device_waves)) - np.stack([librosa_logmel(w) for w in waves])).max()
    cpu = platform.processor() or platform.machine()
    import bat_jax

    load = os.getloadavg()[0]
    device = jax.devices()[0]
    print(
        f"machine: {cpu}, {os.cpu_count()} CPUs (load average {load:.1f}), jax {jax.__version__} on {device}"
    )
    print(f"code: {Path(bat_jax.__file__).parent}")
    print(f"input: {args.batch} clips x {samples} samples ({args.seconds:g} s), {args.repeats} timed repeats")
    print(f"{'front-end':<34} {'clips/s best':>13} {'clips/s median':>15}")
    print(f"{'bat_jax logmel (jit, batched)':<34} {jax_best:>13.1f} {jax_median:>15.1f}")
    print(f"{'prepare Frontend (clip by clip)':<34} {prep_best:>13.1f} {prep_median:>15.1f}")
    print(f"{'librosa (clip by clip)':<34} {lib_best:>13.1f} {lib_median:>15.1f}")
    print(f"{'ratio jax / librosa':<34} {jax_best / lib_best:>13.2f} {jax_median / lib_median:>15.2f}")
    prep_spread = np.abs(bucketed.compute(waves[0]) - librosa_logmel(waves[0])).max()
    print(f"max |jax - librosa| on [0, 1]: {spread:.2e} (prepare Frontend, clip 0: {prep_spread:.2e})")
    print(f"jit cache size after timed runs: {jitted._cache_size()} (1 = no recompilation)")


if __name__ == "__main__":
    main()
