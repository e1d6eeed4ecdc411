"""The text `bat-jax prepare` prints when it finishes: one row per split, skipped inputs by kind, timing."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

from bat_jax.data.prepare.job import PrepareResult


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1000
    return ""


def _by_kind(title: str, entries: list[dict]) -> list[str]:
    """Lines counting skipped inputs or notes ({split, source, kind, reason}) by kind, one example each."""
    if not entries:
        return []
    lines = [f"  {title} ({len(entries)}; every one is listed in manifest.json):"]
    for kind, count in Counter(e["kind"] for e in entries).most_common():
        example = next(e for e in entries if e["kind"] == kind)
        lines.append(
            f"    {kind}: {count}  (e.g. {example['source']}: {textwrap.shorten(example['reason'], 90)})"
        )
    return lines


def format_summary(result: PrepareResult, out: Path) -> str:
    m = result.manifest
    clip = m["clip"]
    clip_text = "full-length clips" if clip["mode"] == "full" else f"clips cut/padded to {clip['seconds']} s"
    lines = [f"bat-jax prepare: {out}  ({m['frontend']['name']} front-end, {clip_text})"]
    columns = ("clips", 8), ("skipped", 8), ("frames", 12), ("hours", 8), ("shards", 7), ("size", 10)
    header = f"  {'split':<12} " + " ".join(f"{name:>{width}}" for name, width in columns) + "  run"
    lines.append(header)
    computed = {r.name: r for r in result.runs}
    for name, s in m["splits"].items():
        r = computed.get(name)
        run = (
            "kept from an earlier run"
            if r is None
            else f"{r.clips_computed} clips computed, {r.shards_reused} shards reused"
        )
        lines.append(
            f"  {name:<12} {s['num_clips']:>8} {s['num_skipped']:>8} {s['total_frames']:>12} "
            f"{s['audio_hours']:>8.3f} {len(s['shards']):>7} {_size(s['bytes']):>10}  {run}"
        )
    for r in result.runs:
        for path, reason in r.shards_repaired:
            lines.append(f"  shard {path} was bad ({reason}): computed again")
    lines += _by_kind("skipped inputs", [s for s in m["skipped"] if s["split"] in computed])
    lines += _by_kind("kept with notes", [s for s in m.get("notes", []) if s["split"] in computed])
    for name in result.unfinished:
        lines.append(f"  split {name!r} is unfinished (an interrupted run): rerun its command to finish it")
    t = m["timing"]
    total = sum(s["bytes"] for s in m["splits"].values())
    rate = f"{t['clips_per_second']:.1f} clips/s" if t["clips_per_second"] is not None else "-"
    merged = f" in {t['parts']} parts, merged" if "parts" in t else ""
    lines.append(
        f"  output {_size(total)}; {t['clips_computed']} clips computed in {t['seconds']:.1f} s ({rate}, "
        f"{t['workers']} worker{'s' if t['workers'] != 1 else ''}{merged})"
    )
    if result.exit_status:
        lines.append(
            "  exit status 1: "
            + (
                "nothing was written"
                if not any(s["num_clips"] for n, s in m["splits"].items() if n in computed)
                else "inputs were skipped (--strict)"
            )
        )
    return "\n".join(lines)


def format_part_summary(result: PrepareResult, out: Path) -> str:
    """What a `--part I/N` run prints: its shards per split, its skipped inputs, which parts are done."""
    index, num_parts = result.part
    lines = [f"bat-jax prepare: part {index}/{num_parts} of {out}  (no manifest: `--merge` writes it)"]
    columns = ("shards", 8), ("clips", 8), ("skipped", 8), ("size", 10)
    lines.append(f"  {'split':<12} " + " ".join(f"{name:>{width}}" for name, width in columns) + "  run")
    for r in result.runs:
        s = result.part_states[r.name]
        size = sum(shard["bytes"] for shard in s["shards"])
        counts = f"{len(s['shards']):>8} {s['num_clips']:>8} {s['num_skipped']:>8} {_size(size):>10}"
        lines.append(
            f"  {r.name:<12} {counts}  {r.clips_computed} clips computed, {r.shards_reused} shards reused"
        )
    for r in result.runs:
        for path, reason in r.shards_repaired:
            lines.append(f"  shard {path} was bad ({reason}): computed again")
    states = result.part_states.values()
    lines += _by_kind("skipped inputs", [e for s in states for e in s["skipped"]])
    lines += _by_kind("kept with notes", [e for s in states for e in s["notes"]])
    if not any(s["shards"] for s in states):
        lines.append(f"  this part has no shards: the command makes fewer than {num_parts} shards")
    t = next(iter(states))["run"] if result.part_states else None
    if t is not None:
        rate = f"{t['clips_per_second']:.1f} clips/s" if t["clips_per_second"] is not None else "-"
        lines.append(
            f"  {t['clips_computed']} clips computed in {t['seconds']:.1f} s ({rate}, {t['workers']} "
            f"worker{'s' if t['workers'] != 1 else ''})"
        )
    missing = [i for i in range(1, num_parts + 1) if i not in result.parts_done]
    merge = f"`bat-jax prepare --merge --out {out}`"
    if missing:
        todo = ", ".join(f"{i}/{num_parts}" for i in missing)
        lines.append(
            f"  parts done: {', '.join(f'{i}/{num_parts}' for i in result.parts_done)}; still to run: {todo} "
            f"(the same command with --part I/{num_parts}); then {merge} writes manifest.json"
        )
    else:
        lines.append(f"  all {num_parts} parts are done: {merge} writes manifest.json")
    if result.exit_status:
        lines.append(
            "  exit status 1: "
            + (
                "this part wrote no clip"
                if not any(s["num_clips"] for s in states)
                else "inputs were skipped (--strict)"
            )
        )
    return "\n".join(lines)
