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
) -> Path:
    """A prepared folder: one shard per split, records as `bat-jax prepare` writes them, a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": 2,
        "frontend": {"name": frontend},
        "n_mels": 128,
        "label_vocabulary": list(vocabulary),
        "splits": {},
    }
    for split, items in splits.items():
        (root / split).mkdir(exist_ok=True)
        rel = f"{split}/{shard_name(split, 0, 1)}"
        fold_values = (folds or {}).get(split)
        writer = ShardWriter(root / rel)
        for i, (spec, labels) in enumerate(items):
            fold = None if fold_values is None else fold_values[i]
            writer.write(records.encode(records.Clip(spec, spec.shape[0], f"{split}/{i}", labels, fold)))
        writer.commit()
        info = {
            "num_clips": len(items),
            "shards": [{"path": rel, "num_records": len(items)}] if items else [],
        }
        if fold_values is not None:
            info["folds"] = {"column": "fold", "by_record": list(fold_values)}
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
