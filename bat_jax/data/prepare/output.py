"""The output folder of `prepare`: refusing foreign or mismatched outputs, finding a split's shards still to
write (resume), and building the manifest from the per-shard progress state (bat_jax.data.shards).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bat_jax.data import records, shards
from bat_jax.data.prepare.events import EVENTS_FIELD, events_entry, events_source
from bat_jax.data.prepare.folds import folds_entry
from bat_jax.data.prepare.frontend import SAMPLE_RATE
from bat_jax.data.prepare.workers import ShardJob
from bat_jax.data.sources import SourcePlan, SplitPlan

FOLD_FIELD = (
    "int | str: the clip's fold (--fold-column; also splits.<split>.folds.by_record, in record order)"
)


class OutputError(RuntimeError):
    """The output folder cannot be written as asked (exists with other settings, not ours...)."""


def jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def _diff(old: dict, new: dict, width: int = 200) -> str:
    """The keys whose values differ, with both values (shortened)."""
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    show = lambda v: textwrap.shorten(repr(v), width)
    return "; ".join(f"{k}: existing {show(old.get(k))} vs now {show(new.get(k))}" for k in keys)


def refuse_foreign(out: Path) -> None:
    """Refuse a non-empty folder not written by `prepare` (never touch its files, even with --overwrite)."""
    progress = out / shards.PROGRESS_DIR
    others = [p.name for p in out.iterdir() if p.name != shards.PROGRESS_DIR] if out.is_dir() else []
    if others and not (progress / "global.json").is_file():
        raise OutputError(
            f"{out} exists and is not a `bat-jax prepare` output (no {shards.PROGRESS_DIR}/global.json), "
            f"found {sorted(others)[:5]}; choose a new or empty folder"
        )


def check_output(out: Path, global_cfg: dict, split_cfgs: dict[str, dict], overwrite: bool) -> None:
    """Refuse an output made with other settings (unless `overwrite`, which deletes what must be redone).

    `out` has passed refuse_foreign (prepare() runs it before it creates the lock file in `out`).
    """
    progress = out / shards.PROGRESS_DIR
    existing = shards.read_json(progress / "global.json")
    if existing is None:
        return
    if existing != global_cfg:
        if not overwrite:
            raise OutputError(
                f"{out} was prepared with other settings ({_diff(existing, global_cfg)}); "
                "use another --out, or --overwrite to delete it and start again"
            )
        for split in shards.progress_splits(out):
            shards.remove_split(out, split)
        (out / shards.MANIFEST).unlink(missing_ok=True)
        (progress / "global.json").unlink(missing_ok=True)
        return
    for split, cfg in split_cfgs.items():
        state = shards.read_json(progress / split / "split.json")
        if overwrite:
            shards.remove_split(out, split)
        elif state is None and (out / split).exists():
            raise OutputError(
                f"{out / split} exists but has no progress state; use --overwrite to replace it"
            )
        elif state is not None and state.get("config") != cfg:
            raise OutputError(
                f"split {split!r} of {out} was prepared from other inputs or settings "
                f"({_diff(state.get('config', {}), cfg)}); use --overwrite to redo it"
            )


def split_config(source: SourcePlan, split: SplitPlan, ranges: list[range], sharding: dict) -> dict:
    names = [shards.shard_name(split.name, k, len(ranges)) for k in range(len(ranges))]
    return jsonable(
        {
            "source": source.description,
            "inputs_digest": split.digest,
            "num_inputs": len(split.tasks),
            "sharding": sharding,
            "shards": names,
            "shard_sizes": [len(r) for r in ranges],
        }
    )


@dataclass
class SplitRun:
    """What one split's run did (for the summary)."""

    name: str
    shards_total: int
    shards_reused: int
    clips_computed: int
    # shards found finished but bad (checksum, size, records) and computed again: (path in OUT, reason)
    shards_repaired: list[tuple[str, str]] = field(default_factory=list)


def _shards_to_write(
    out: Path, split: str, names: list[str], config_digest: str, indices: Sequence[int] | None = None
):
    """(indices of the shards to write among `indices` (default all), [(path, reason)] of finished shards that
    turned out bad)."""
    state_dir = out / shards.PROGRESS_DIR / split
    indices = range(len(names)) if indices is None else indices
    dones = {k: shards.read_json(state_dir / (names[k] + shards.DONE_SUFFIX)) for k in indices}
    finished = [  # the shards whose checksum decides (settings and size agree): hashed ahead, in threads
        out / split / names[k]
        for k, done in dones.items()
        if done
        and done.get("config_digest") == config_digest
        and (out / split / names[k]).is_file()
        and (out / split / names[k]).stat().st_size == done.get("bytes")
    ]
    todo, repaired = [], []
    with shards.hashing(finished) as hash_of:
        for k, done in dones.items():
            name = names[k]
            problem = shards.shard_problem(out / split / name, done, config_digest, hash_of)
            if problem is not None:
                todo.append(k)
                if done is not None and done.get("config_digest") == config_digest:
                    repaired.append((f"{split}/{name}", problem))
    return todo, repaired


def split_jobs(
    out: Path, split: SplitPlan, ranges: list[range], config_digest: str, indices: Sequence[int] | None = None
) -> tuple[list[ShardJob], list[tuple[str, str]]]:
    """The shards of `split` to write (those of `indices`, default all, that are not done or no longer
    intact), as jobs for the Runner, and [(path in OUT, reason)] of finished shards found bad. Their stale
    .done.json files are deleted here: a shard counts as done again only once it is rewritten."""
    state_dir = out / shards.PROGRESS_DIR / split.name
    (out / split.name).mkdir(parents=True, exist_ok=True)
    names = [shards.shard_name(split.name, k, len(ranges)) for k in range(len(ranges))]
    todo, repaired = _shards_to_write(out, split.name, names, config_digest, indices)
    jobs = []
    for k in todo:
        (state_dir / (names[k] + shards.DONE_SUFFIX)).unlink(missing_ok=True)
        tasks = tuple(split.tasks[i] for i in ranges[k])
        jobs.append(ShardJob(split.name, k, names[k], tasks, config_digest))
    return jobs, repaired


def _split_entry(out: Path, split: str) -> dict | None:
    """The manifest entry of a finished split from its progress state, or None if it is not finished."""
    state_dir = out / shards.PROGRESS_DIR / split
    state = shards.read_json(state_dir / "split.json")
    if state is None:
        return None
    entry = {
        "num_clips": 0,
        "num_skipped": len(state["pre_skipped"]),
        "num_notes": 0,
        "total_frames": 0,
        "num_samples": 0,
    }
    shard_list, skipped, notes, num_bytes = [], list(state["pre_skipped"]), [], 0
    fold_column = state["config"]["source"].get("fold_column")
    by_record = []  # the fold of each record, in order (with --fold-column)
    with_events = events_source(state["config"]["source"])  # records carry events (--events-csv...)
    counts = {"num_events": 0, "num_clips_without_events": 0}
    for name in state["config"]["shards"]:
        done = shards.read_json(state_dir / (name + shards.DONE_SUFFIX))
        path = out / split / name
        if done is None or not path.is_file() or path.stat().st_size != done["bytes"]:
            return None
        shard_list.append(
            {
                "path": f"{split}/{name}",
                "num_records": done["num_records"],
                "bytes": done["bytes"],
                "sha256": done.get("sha256"),
            }
        )
        entry["num_clips"] += done["num_records"]
        entry["num_skipped"] += len(done["skipped"])
        entry["num_notes"] += len(done.get("notes", []))
        entry["total_frames"] += done["total_frames"]
        entry["num_samples"] += done["num_samples"]
        skipped += done["skipped"]
        notes += done.get("notes", [])
        if fold_column is not None:
            shard_folds = done.get("folds", [] if done["num_records"] == 0 else None)
            if shard_folds is None or len(shard_folds) != done["num_records"]:
                return None  # written without its folds: not a finished split of this configuration
            by_record += shard_folds
        if with_events is not None:
            shard_events = done.get("events", {} if done["num_records"] == 0 else None)
            if shard_events is None:
                return None  # written without its events: not a finished split of this configuration
            for key in counts:
                counts[key] += shard_events.get(key, 0)
        num_bytes += done["bytes"]
    entry["audio_hours"] = entry["num_samples"] / SAMPLE_RATE / 3600
    entry.update(
        shards=shard_list,
        bytes=num_bytes,
        source=state["config"]["source"],
        command=state["command"],
        seconds=state.get("seconds"),
        skipped=skipped,
        notes=notes,
    )
    if fold_column is not None:
        entry["folds"] = folds_entry(fold_column, by_record)
    if with_events is not None:
        entry["events"] = events_entry(with_events, **counts)
    return entry


def _split_order(name: str) -> tuple[int, str]:
    """Usual splits first, in their usual order, then the others alphabetically."""
    usual = ("train", "valid", "validation", "eval", "test")
    return (usual.index(name) if name in usual else len(usual), name)


def build_manifest(out: Path, global_cfg: dict, command: list[str], timing: dict) -> tuple[dict, list[str]]:
    """The manifest of every finished split in OUT, and the names of unfinished ones."""
    from bat_jax import __version__

    splits, skipped, notes, unfinished = {}, [], [], []
    for split in sorted(shards.progress_splits(out), key=_split_order):
        entry = _split_entry(out, split)
        if entry is None:
            unfinished.append(split)
            continue
        skipped += entry.pop("skipped")
        notes += entry.pop("notes")
        splits[split] = entry
    record_fields = {
        "spec": "float16 [frames, n_mels]",
        "num_frames": "int: true number of frames (spec rows past it are zero padding)",
        "clip_id": "str",
        "labels": "list[int]: indices into label_vocabulary",
    }
    if any("folds" in entry for entry in splits.values()):
        record_fields["fold"] = FOLD_FIELD
    if any("events" in entry for entry in splits.values()):
        record_fields["events"] = EVENTS_FIELD
    manifest = {
        "format_version": records.FORMAT_VERSION,
        "bat_jax_version": __version__,
        "frontend": global_cfg["frontend"],
        "sample_rate": global_cfg["sample_rate"],
        "n_mels": global_cfg["n_mels"],
        "clip": global_cfg["clip"],
        "label_vocabulary": global_cfg["label_vocabulary"],
        "record_fields": record_fields,
        "record_encoding": "msgpack (bat_jax.data.records)",
        "arrayrecord_options": shards.WRITER_OPTIONS,
        "splits": splits,
        "skipped": skipped,
        "notes": notes,
        "command": command,
        "timing": timing,
    }
    return manifest, unfinished
