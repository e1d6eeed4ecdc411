"""Small prepared folders (the layout `bat-jax prepare` writes) and a tiny saved encoder for the job tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bat_jax.data import records
from bat_jax.data.shards import ShardWriter, shard_name

VOCABULARY = ["a", "b", "c", "d"]


def clips(n: int, *, frames: int = 64, seed: int = 0, multilabel: bool = False, classes: int = 4):
    """n clips whose spectrogram carries the class (a bright band per class) over noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if multilabel:
            labels = tuple(sorted({i % classes, int(rng.integers(0, classes))}))
        else:
            labels = (i % classes,)
        spec = rng.uniform(0.0, 0.3, (frames, 128)).astype(np.float16)
        for c in labels:
            spec[:, 32 * c : 32 * c + 16] += np.float16(0.6)
        out.append((spec, labels))
    return out


def write_prepared(
    root: Path,
    splits: dict[str, list],
    *,
    vocabulary=VOCABULARY,
    frontend: str = "bat",
    folds: dict[str, list] | None = None,
    events: dict[str, list] | None = None,
) -> Path:
    """A prepared folder: one shard per split, records as `bat-jax prepare` writes them, a manifest.
    `events[split][i]`: clip i's events ((onset s, offset s, class), ...), as `prepare --events-csv` stores
    them (the BAT front-end's 10 ms hop)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": 2,
        "frontend": {"name": frontend, "params": {"hop_length": 160, "sample_rate": 16000}},
        "n_mels": 128,
        "label_vocabulary": list(vocabulary),
        "splits": {},
    }
    for split, items in splits.items():
        (root / split).mkdir(exist_ok=True)
        rel = f"{split}/{shard_name(split, 0, 1)}"
        fold_values = (folds or {}).get(split)
        event_values = (events or {}).get(split)
        writer = ShardWriter(root / rel)
        for i, (spec, labels) in enumerate(items):
            fold = None if fold_values is None else fold_values[i]
            extra = {} if event_values is None else {"events": tuple(event_values[i])}
            clip = records.Clip(spec, spec.shape[0], f"{split}/{i}", labels, fold, **extra)
            writer.write(records.encode(clip))
        writer.commit()
        info = {
            "num_clips": len(items),
            "shards": [{"path": rel, "num_records": len(items)}] if items else [],
        }
        if fold_values is not None:
            info["folds"] = {"column": "fold", "by_record": list(fold_values)}
        if event_values is not None:
            info["events"] = {"source": "events_csv", "num_events": sum(map(len, event_values))}
        manifest["splits"][split] = info
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def tiny_encoder(path: Path, depth: int = 2, dim: int = 32, heads: int = 2) -> Path:
    from bat_jax.convert import save_encoder
    from bat_jax.models.config import EncoderConfig
    from bat_jax.models.encoder import FrozenEncoder

    if not (path / "config.json").exists():
        save_encoder(FrozenEncoder.random(EncoderConfig(dim=dim, depth=depth, num_heads=heads)), path)
    return path


def probe_config(encoder: Path, root: Path, **overrides):
    from bat_jax.train.config import load

    c = load("configs/probe/synthetic.py")
    c.encoder.path = str(encoder)
    c.data.root = str(root)
    c.data.test_split = "test"
    c.data.multilabel = "auto"
    c.frames = 64
    c.cache.enabled = False  # the tests of the cache turn it on
    c.probes = "cgp,lcgp,lp"
    c.probe.num_prototypes = 16
    c.train.steps = 6
    c.train.batch_size = 8
    c.train.log_every = 3
    c.optim.warmup_steps = 2
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            c[section][field] = value
        else:
            c[section] = value
    return c


PATCH_SECONDS = 0.16  # a time patch: 16 frames of the 10 ms hop


def event_clips(n: int, *, patches: int = 8, seed: int = 0, classes: int = 4, pad_patches: int = 0):
    """n clips of sound events for frame-wise probes: (spec, labels) items and their events. Each clip has
    1-2 events of distinct classes spanning whole time patches; during an event of class c, mel bins
    4c..4c+3 of every 16 (every frequency patch) are bright: each class has its own patch content, which
    frequency pooling keeps (a band at one frequency patch, as in `clips`, would differ only in position).
    The clips stop `pad_patches` time patches short of `patches` (the loader zero-pads them)."""
    rng = np.random.default_rng(seed)
    items, events = [], []
    for i in range(n):
        spec = rng.uniform(0.0, 0.3, (16 * patches, 128)).astype(np.float16)
        audio = patches - pad_patches
        kinds = [i % classes] + ([int(rng.integers(0, classes))] if i % 2 else [])
        clip_events = []
        for c in sorted(set(kinds)):
            start = int(rng.integers(0, audio - 1))
            stop = int(rng.integers(start + 1, audio + 1))
            bins = (np.arange(128) % 16) // 4 == c
            spec[16 * start : 16 * stop, bins] += np.float16(0.6)
            clip_events.append((start * PATCH_SECONDS, stop * PATCH_SECONDS, c))
        spec[16 * audio :] = 0
        items.append((spec[: 16 * audio] if pad_patches else spec, tuple(sorted(set(kinds)))))
        events.append(clip_events)
    return items, events
