"""`prepare --part I/N` and `prepare --merge`: one dataset's preparation split across machines.

Every part runs the same command (only --part and --workers may differ) into the same OUT (a shared disk or
a mounted bucket). The shards of the command are counted over its splits in order (train's, then eval's...),
and the g-th one (from 0) belongs to part g % N + 1: round-robin, so clips that are longer in one region of
the sorted inputs do not all land on one machine, and every part gets shards of every large split. A part
writes its shards exactly as a run of the whole command would (same names, same bytes, same .done.json),
then, per split, OUT/.progress/<split>/part-I-of-N.json (its shards with their sha256, counts, skipped
inputs, its command and timing), and never manifest.json.

`bat-jax prepare --merge --out OUT` checks that every part of every split is there and agrees (settings
digest, each shard's .done.json, size and sha256), naming the missing parts with the command that makes them,
then writes manifest.json from the same progress state a single run reads: byte for byte the manifest a run
of the whole command on one machine writes, except the fields that describe a run rather than the data:
`command` and `timing` (top level), `splits.<split>.command` and `splits.<split>.seconds` (MERGE_RUN_FIELDS).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import time
from collections.abc import Sequence
from pathlib import Path

from bat_jax.data import shards
from bat_jax.data.prepare.output import OutputError, SplitRun, _diff, _split_order, build_manifest

ASSIGNMENT = (
    "round-robin: the command's shards counted over its splits in order, the g-th (from 0) in part g % N + 1"
)
# manifest fields that describe the run, not the data: they differ between a merged and a single-machine run
MERGE_RUN_FIELDS = ("command", "timing", "splits.<split>.command", "splits.<split>.seconds")
_PART_FILE = re.compile(r"part-(\d+)-of-(\d+)\.json")


def parse_part(text: str) -> tuple[int, int]:
    """An argparse type: I/N, the part I of N (1 <= I <= N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if match is None or not 1 <= int(match[1]) <= int(match[2]):
        raise argparse.ArgumentTypeError(f"expected I/N with N >= 1 and 1 <= I <= N (e.g. 2/3), found {text}")
    return int(match[1]), int(match[2])


def assign(shard_counts: Sequence[int], part: tuple[int, int] | None) -> list[list[int]]:
    """Per split (`shard_counts[s]` shards), the shard indices of `part` (all of them when None): see
    ASSIGNMENT."""
    if part is None:
        return [list(range(n)) for n in shard_counts]
    index, num_parts = part
    mine, offset = [], 0
    for n in shard_counts:
        mine.append([k for k in range(n) if (offset + k) % num_parts == index - 1])
        offset += n
    return mine


def part_name(part: tuple[int, int]) -> str:
    return f"{part[0]}/{part[1]}"


def part_path(out: Path, split: str, part: tuple[int, int]) -> Path:
    return out / shards.PROGRESS_DIR / split / f"part-{part[0]}-of-{part[1]}.json"


def part_files(out: Path, split: str) -> dict[tuple[int, int], Path]:
    """(I, N) -> the part-state files of `split` in OUT."""
    folder = out / shards.PROGRESS_DIR / split
    found = {}
    for path in folder.glob("part-*-of-*.json") if folder.is_dir() else ():
        match = _PART_FILE.fullmatch(path.name)
        if match:
            found[int(match[1]), int(match[2])] = path
    return dict(sorted(found.items()))


def strip_part(command: Sequence[str]) -> list[str]:
    """`command` without its --part I/N (what the whole job's command on one machine is)."""
    stripped, skip = [], False
    for word in command:
        if skip:
            skip = False
        elif word == "--part":
            skip = True
        elif not word.startswith("--part="):
            stripped.append(word)
    return stripped


def show_command(command: Sequence[str]) -> str:
    """A command line as the user typed it (the console script or `python -m bat_jax.cli` shown as
    bat-jax)."""
    words = list(command)
    if words and (Path(words[0]).name == "bat-jax" or words[0].endswith(("bat_jax/cli.py", "bat_jax.cli"))):
        words[0] = "bat-jax"
    return shlex.join(words)


@contextlib.contextmanager
def locks(out: Path, part: tuple[int, int]):
    """The locks of a part: OUT's lock shared (other parts run too; a whole run or --merge waits), its own
    exclusive (the same part twice at once is refused)."""
    name = f"lock-part-{part[0]}-of-{part[1]}"
    holder = "`bat-jax prepare` without --part, or --merge,"
    with shards.OutputLock(out, shared=True, holder=holder):
        with shards.OutputLock(out, name, holder=f"`bat-jax prepare --part {part_name(part)}`"):
            yield


def check_part(out: Path, part: tuple[int, int], global_cfg: dict, split_cfgs: dict[str, dict]) -> None:
    """Refuse a part whose N or settings differ from the parts already in OUT (one line each)."""
    index, num_parts = part
    where = f"--part {part_name(part)}"
    progress = out / shards.PROGRESS_DIR
    existing = shards.read_json(progress / "global.json")
    if existing is not None and existing != global_cfg:
        raise OutputError(
            f"{where}: {out} holds parts prepared with other settings ({_diff(existing, global_cfg)}); every "
            "part must run the same command (only --part and --workers may differ)"
        )
    for split, cfg in split_cfgs.items():
        state = shards.read_json(progress / split / "split.json") or {}
        if state.get("config") not in (None, cfg):
            raise OutputError(
                f"{where}: split {split!r} of {out} holds parts prepared from other inputs or settings "
                f"({_diff(state['config'], cfg)}); every part must run the same command (only --part and "
                "--workers may differ)"
            )
        counts = {n for _, n in part_files(out, split)}
        if state.get("parts"):
            counts.add(state["parts"]["num_parts"])
        other = sorted(counts - {num_parts})
        if other:
            raise OutputError(
                f"{where}: split {split!r} of {out} is being prepared in {other[0]} parts, found N = "
                f"{num_parts}; run every part with --part I/{other[0]} (or use another --out)"
            )


def split_state(
    config: dict, pre_skipped: list[dict], command: list[str], part: tuple[int, int] | None
) -> dict:
    """The split.json a run writes when it starts (a part's: its command without --part, and N)."""
    if part is None:
        return {"config": config, "pre_skipped": pre_skipped, "command": command}
    return {
        "config": config,
        "pre_skipped": pre_skipped,
        "command": strip_part(command),
        "parts": {"num_parts": part[1], "assignment": ASSIGNMENT},
    }


def forget_parts(out: Path, split: str) -> None:
    """A run of the whole command finishes the split itself: the part state of earlier parts goes."""
    for path in part_files(out, split).values():
        path.unlink(missing_ok=True)


def write_part_state(
    out: Path,
    split: SplitRun,
    part: tuple[int, int],
    indices: Sequence[int],
    config: dict,
    digest: str,
    run: dict,
) -> dict:
    """OUT/.progress/<split>/part-I-of-N.json from the .done.json of the part's shards (all written) and what
    this run did (`split`, and `run`: the whole part's command, workers and timing)."""
    split, this_run = split.name, split
    state_dir = out / shards.PROGRESS_DIR / split
    listed, skipped, notes = [], [], []
    for k in indices:
        name = config["shards"][k]
        done = shards.read_json(state_dir / (name + shards.DONE_SUFFIX))
        listed.append(
            {
                "index": k,
                "name": name,
                "num_records": done["num_records"],
                "bytes": done["bytes"],
                "sha256": done["sha256"],
            }
        )
        skipped += done["skipped"]
        notes += done.get("notes", [])
    state = {
        "part": part[0],
        "num_parts": part[1],
        "split": split,
        "assignment": ASSIGNMENT,
        "config_digest": digest,
        "shards": listed,
        "num_clips": sum(s["num_records"] for s in listed),
        "num_skipped": len(skipped),
        "skipped": skipped,
        "notes": notes,
        "clips_computed": this_run.clips_computed,
        "shards_reused": this_run.shards_reused,
        "run": run,
    }
    shards.write_json(part_path(out, split, part), state)
    return state


def _list(parts: Sequence[tuple[int, int]]) -> str:
    names = [part_name(p) for p in parts]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def parts_done(out: Path, splits: Sequence[str], num_parts: int) -> tuple[list[int], list[int]]:
    """(parts finished for every one of `splits`, parts still missing)."""
    done = [
        i for i in range(1, num_parts + 1) if all(part_path(out, s, (i, num_parts)).is_file() for s in splits)
    ]
    return done, [i for i in range(1, num_parts + 1) if i not in done]


def _check_split(out: Path, split: str, global_cfg: dict, state: dict) -> tuple[int, dict, list, list[str]]:
    """(N, {I: part state}, missing (I, N), problems) of a split prepared in parts."""
    files = part_files(out, split)
    counts = {n for _, n in files} | ({state["parts"]["num_parts"]} if state.get("parts") else set())
    if len(counts) > 1:
        raise OutputError(
            f"--merge: split {split!r} of {out} has parts of different counts N ({sorted(counts)}: "
            f"{', '.join(p.name for p in files.values())}); delete the files of the wrong N and rerun"
        )
    (num_parts,) = counts
    states = {i: shards.read_json(path) for (i, n), path in files.items()}
    missing = [(i, num_parts) for i in range(1, num_parts + 1) if states.get(i) is None]
    problems = []
    digest = shards.digest({"global": global_cfg, "split": state["config"]})
    owner: dict[str, int] = {}
    for i, part in states.items():
        if part is None:
            continue
        if part.get("config_digest") != digest:
            problems.append(
                f"part {i}/{num_parts} of split {split!r} was prepared with other settings than OUT's: rerun "
                f"it with the command that made the other parts"
            )
            continue
        for shard in part["shards"]:
            name = shard["name"]
            if name in owner:
                problems.append(
                    f"shard {split}/{name} is in parts {owner[name]}/{num_parts} and {i}/{num_parts}"
                )
            owner[name] = i
            done = shards.read_json(out / shards.PROGRESS_DIR / split / (name + shards.DONE_SUFFIX)) or {}
            path = out / split / name
            size = path.stat().st_size if path.is_file() else None
            agree = done.get("config_digest") == digest and done.get("sha256") == shard["sha256"]
            if size is None or size != shard["bytes"] or not agree:
                found = "no file" if size is None else f"{size} bytes, the part wrote {shard['bytes']}"
                if size == shard["bytes"]:
                    found = "its .done.json no longer matches the part"
                problems.append(
                    f"shard {split}/{name} of part {i}/{num_parts} is missing or changed since the part "
                    f"finished ({found}): rerun part {i}/{num_parts} (it recomputes only bad shards)"
                )
    if not missing:
        absent = [name for name in state["config"]["shards"] if name not in owner]
        if absent:
            problems.append(
                f"split {split!r}: no part wrote shard {absent[0]}"
                + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                + f"; its parts do not cover the split: rerun them with the same N = {num_parts}"
            )
    return num_parts, states, missing, problems


def merge(out: str | Path, *, strict: bool = False):
    """`bat-jax prepare --merge --out OUT`: check every part of OUT, then write manifest.json (module
    docstring). Returns a PrepareResult (the manifest, one SplitRun per split made in parts)."""
    from bat_jax.data.prepare.job import PrepareResult

    start = time.time()
    out = Path(out).expanduser().resolve()
    global_cfg = shards.read_json(out / shards.PROGRESS_DIR / "global.json")
    if global_cfg is None:
        raise OutputError(
            f"--merge: expected a `bat-jax prepare --part I/N` output in {out} (.progress/global.json), "
            "found none"
        )
    with shards.OutputLock(out, holder="`bat-jax prepare` (a part still running?)"):
        merged, missing, problems, runs = {}, {}, [], {}
        for split in shards.progress_splits(out):
            state = shards.read_json(out / shards.PROGRESS_DIR / split / "split.json") or {}
            if not state.get("parts") and not part_files(out, split):
                continue  # prepared by a run of the whole command: build_manifest takes it as it is
            num_parts, states, absent, found = _check_split(out, split, global_cfg, state)
            merged[split] = (state, states)
            problems += found
            for key in absent:
                missing.setdefault(key, (state["command"], []))[1].append(split)
            for part in states.values():
                if part is not None:
                    runs.setdefault(shards.digest(part["run"]), part["run"])
        if not merged:
            raise OutputError(
                f"--merge: expected parts (.progress/<split>/part-I-of-N.json, from `bat-jax prepare ... "
                f"--part I/N`) in {out}, found none: a run without --part writes its manifest itself"
            )
        if missing:
            keys = sorted(missing, key=lambda p: (p[1], p[0]))
            splits = sorted({s for key in keys for s in missing[key][1]}, key=_split_order)
            run = show_command([*missing[keys[0]][0], "--part", part_name(keys[0])])
            more = f" (and the same with --part {_list(keys[1:])})" if len(keys) > 1 else ""
            which = f"part{'s' if len(keys) > 1 else ''} {_list(keys)}"
            where = f"split{'s' if len(splits) > 1 else ''} {', '.join(splits)}"
            raise OutputError(
                f"--merge: missing {which} of {out} ({where}): run `{run}`{more}, then --merge again"
            )
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise OutputError(f"--merge: {problems[0]}{more}")
        split_runs = []
        for split, (state, states) in merged.items():
            seconds = max(p["run"]["seconds"] for p in states.values())
            shards.write_json(out / shards.PROGRESS_DIR / split / "split.json", {**state, "seconds": seconds})
            split_runs.append(
                SplitRun(
                    split,
                    len(state["config"]["shards"]),
                    sum(p["shards_reused"] for p in states.values()),
                    sum(p["clips_computed"] for p in states.values()),
                )
            )
        wall = max(r["seconds"] for r in runs.values())
        computed = sum(r["clips_computed"] for r in runs.values())
        timing = {
            "seconds": round(wall, 3),  # the slowest part (parts run side by side)
            "clips_computed": computed,
            "clips_per_second": round(computed / wall, 3) if wall > 0 else None,
            "workers": sum(r["workers"] for r in runs.values()),
            "shards_computed": sum(r["shards_computed"] for r in runs.values()),
            "shards_reused": sum(r["shards_reused"] for r in runs.values()),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "parts": len(runs),
            "merge_seconds": round(time.time() - start, 3),
        }
        first = next(iter(merged.values()))[0]
        manifest, unfinished = build_manifest(out, global_cfg, list(first["command"]), timing)
        shards.write_json(out / shards.MANIFEST, manifest)
    entries = [manifest["splits"][s] for s in merged if s in manifest["splits"]]
    written = sum(e["num_clips"] for e in entries)
    skipped = sum(e["num_skipped"] for e in entries)
    status = 1 if written == 0 or (strict and skipped > 0) else 0
    return PrepareResult(manifest, split_runs, unfinished, time.time() - start, status)
