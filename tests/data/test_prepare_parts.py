"""`bat-jax prepare --part I/N` and `--merge`: one dataset prepared on several machines into one OUT gives the
shards and manifest of a run on one machine; missing, mismatched or damaged parts are one-line errors."""

import json
import shlex
import sys
from pathlib import Path

import pytest

from bat_jax.cli import main
from bat_jax.data import prepare
from tests.data.prepared import run_cli, wav

SYNTH = [
    "--source", "synthetic", "--min-seconds", "0.3", "--max-seconds", "1.2", "--num-clips", "30",
    "--num-eval-clips", "9", "--clips-per-shard", "4", "--multilabel", "--synthetic-events",
]  # fmt: skip
# 8 train shards + 3 eval shards = 11, round-robin over 3 parts: part 1 gets the command's shards 0, 3, 6, 9
PART_SHARDS = {
    1: ["train-00000", "train-00003", "train-00006", "eval-00001"],
    2: ["train-00001", "train-00004", "train-00007", "eval-00002"],
    3: ["train-00002", "train-00005", "eval-00000"],
}


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.arrayrecord"))}


def normalised_manifest(out: Path) -> str:
    """manifest.json as text, with the fields that describe a run (prepare.MERGE_RUN_FIELDS) blanked."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["command"] = manifest["timing"] = None
    for split in manifest["splits"].values():
        split["command"] = split["seconds"] = None
    return json.dumps(manifest, indent=1)


def written_shards(out: Path, part: int, num_parts: int = 3) -> list[str]:
    """The shards a part's state files list, as 'train-00003'."""
    names = []
    for path in sorted(out.glob(f".progress/*/part-{part}-of-{num_parts}.json")):
        names += [s["name"].split("-of-")[0] for s in json.loads(path.read_text())["shards"]]
    return names


def test_three_parts_merge_into_the_single_machine_output_byte_for_byte(tmp_path, capsys, monkeypatch):
    one, out = tmp_path / "one", tmp_path / "parts"
    assert run_cli(*SYNTH, "--out", one) == 0
    command = ["bat-jax", "prepare", *SYNTH, "--out", str(out), "--part", "2/3"]
    monkeypatch.setattr(sys, "argv", command)  # what the command records (the tests call main() directly)
    assert run_cli(*SYNTH, "--out", out, "--part", "2/3") == 0
    summary = capsys.readouterr().out
    assert "part 2/3 of" in summary and "still to run: 1/3, 3/3" in summary
    assert not (out / "manifest.json").exists()
    assert sorted(p.name.split("-of-")[0] for p in out.glob("*/*.arrayrecord")) == sorted(PART_SHARDS[2])
    # merging too early names the missing parts and the command that makes them; no manifest
    assert main(["prepare", "--merge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "bat-jax prepare: error: --merge: missing parts 1/3 and 3/3"
    )
    run_part_1 = shlex.join([*command[:-1], "1/3"])
    assert f"run `{run_part_1}` (and the same with --part 3/3), then --merge again" in err
    assert not (out / "manifest.json").exists()
    for part in (3, 1):
        assert run_cli(*SYNTH, "--out", out, "--part", f"{part}/3") == 0
    assert "all 3 parts are done" in capsys.readouterr().out
    for part, expected in PART_SHARDS.items():  # disjoint shares, round-robin over the command's shards
        assert sorted(written_shards(out, part)) == sorted(expected)
    state = json.loads((out / ".progress/train/part-1-of-3.json").read_text())
    assert state["num_clips"] == 12 and state["run"]["clips_computed"] == 16 and state["skipped"] == []
    assert all(len(s["sha256"]) == 64 for s in state["shards"])
    assert not (out / "manifest.json").exists()
    assert main(["prepare", "--merge", "--out", str(out)]) == 0
    assert "in 3 parts, merged" in capsys.readouterr().out
    assert shard_files(out) == shard_files(one) and len(shard_files(one)) == 11
    assert normalised_manifest(out) == normalised_manifest(one)
    merged = json.loads((out / "manifest.json").read_text())
    assert merged["splits"]["train"]["events"]["num_events"] > 0 and merged["timing"]["parts"] == 3
    assert "--part" not in merged["command"] and "--part" not in merged["splits"]["eval"]["command"]
    assert main(["verify", str(out)]) == 0
    # a part run again reuses its shards; merging again gives the same manifest
    assert run_cli(*SYNTH, "--out", out, "--part", "2/3") == 0
    assert "0 clips computed, 3 shards reused" in capsys.readouterr().out
    assert main(["prepare", "--merge", "--out", str(out)]) == 0
    assert normalised_manifest(out) == normalised_manifest(one)


def fold_folder(tmp_path: Path) -> tuple[Path, Path]:
    """Six labelled clips with a fold each, one file the CSV does not list, one corrupt listed file."""
    root = tmp_path / "audio"
    rows = ["filename,fold,category"]
    for i in range(6):
        wav(root / f"{i}.wav", freq=300.0 + 100 * i)
        rows.append(f"{i}.wav,{1 + i % 3},{'dog' if i % 2 else 'cat'}")
    (root / "broken.wav").write_text("not audio")
    rows.append("broken.wav,2,cat")
    wav(root / "unlisted.wav")
    csv_path = tmp_path / "meta.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return root, csv_path


def test_parts_with_folds_and_skipped_inputs_merge_like_one_run(tmp_path):
    root, csv_path = fold_folder(tmp_path)
    args = ["--source", "folder", "--input", root, "--labels-csv", csv_path, "--csv-columns",
            "filename,category", "--fold-column", "fold", "--clips-per-shard", "2"]  # fmt: skip
    one, out = tmp_path / "one", tmp_path / "parts"
    assert run_cli(*args, "--out", one) == 0
    for part in (1, 2, 3):
        assert run_cli(*args, "--out", out, "--part", f"{part}/3") == 0
    assert main(["prepare", "--merge", "--out", str(out)]) == 0
    assert shard_files(out) == shard_files(one) and len(shard_files(one)) == 4
    assert normalised_manifest(out) == normalised_manifest(one)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["folds"]["by_record"] == [1, 2, 3, 1, 2, 3]
    assert sorted(s["source"] for s in manifest["skipped"]) == ["broken.wav", "unlisted.wav"]
    # the corrupt file is skipped inside shard 3 (part 1's) and listed in that part's state
    state = json.loads((out / ".progress/train/part-1-of-3.json").read_text())
    assert [s["source"] for s in state["skipped"]] == ["broken.wav"] and state["num_skipped"] == 1


def test_part_flag_values_are_one_line_errors(tmp_path, capsys):
    for value in ("0/3", "4/3", "1/0", "2", "a/b", "1/-2"):
        with pytest.raises(SystemExit) as e:
            run_cli(*SYNTH, "--out", tmp_path / "out", "--part", value)
        assert e.value.code == 2
        expected = f"--part: expected I/N with N >= 1 and 1 <= I <= N (e.g. 2/3), found {value}"
        assert capsys.readouterr().err == f"bat-jax prepare: error: {expected}\n"
    assert not (tmp_path / "out").exists()


def test_mismatched_parts_and_bad_merges_are_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"

    def refused(*args) -> str:
        capsys.readouterr()
        assert main(["prepare", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bat-jax prepare: error: ") and err.count("\n") == 1, err
        return err

    assert "expected a `bat-jax prepare --part I/N` output" in refused("--merge", "--out", out)
    assert "required: --source" in refused("--out", out)
    assert run_cli(*SYNTH, "--out", out, "--part", "1/3") == 0
    err = refused(*SYNTH, "--out", out, "--part", "2/4", "--workers", 1)
    assert "is being prepared in 3 parts, found N = 4; run every part with --part I/3" in err
    for other in (["--frontend", "kaldi"], ["--seed", "1"], ["--clips-per-shard", "5"]):
        err = refused(*SYNTH, *other, "--out", out, "--part", "2/3", "--workers", 1)
        assert "--part 2/3: " in err and "every part must run the same command" in err
    assert "--overwrite would delete the other parts' shards" in refused(
        *SYNTH, "--out", out, "--part", "2/3", "--overwrite"
    )
    assert "expected only --out (and --strict, --no-progress), found --source --part" in refused(
        "--merge", "--out", out, "--source", "synthetic", "--part", "1/3"
    )
    assert "missing parts 2/3 and 3/3" in refused("--merge", "--out", out)
    # a run of the whole command writes its own manifest: nothing to merge
    assert run_cli(*SYNTH, "--num-clips", 3, "--num-eval-clips", 0, "--out", tmp_path / "single") == 0
    assert "found none: a run without --part writes its manifest itself" in refused(
        "--merge", "--out", tmp_path / "single"
    )


def test_merge_names_a_damaged_shard_and_the_part_rerun_repairs_only_it(tmp_path, capsys):
    out = tmp_path / "out"
    for part in (1, 2, 3):
        assert run_cli(*SYNTH, "--out", out, "--part", f"{part}/3") == 0
    lost = out / "train" / "train-00004-of-00008.arrayrecord"  # part 2's
    lost.unlink()
    capsys.readouterr()
    assert main(["prepare", "--merge", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "shard train/train-00004-of-00008.arrayrecord of part 2/3 is missing or changed" in err
    assert "rerun part 2/3" in err and not (out / "manifest.json").exists()
    assert run_cli(*SYNTH, "--out", out, "--part", "2/3") == 0
    assert "4 clips computed, 2 shards reused" in capsys.readouterr().out  # train: 1 of 3 shards again
    assert main(["prepare", "--merge", "--out", str(out)]) == 0
    assert main(["verify", str(out)]) == 0


def test_a_whole_run_finishes_a_split_up_output_and_a_part_without_shards_is_fine(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(*SYNTH, "--out", out, "--part", "1/3") == 0
    # the whole command: reuses part 1's shards, writes the manifest
    assert run_cli(*SYNTH, "--out", out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timing"]["shards_reused"] == 4 and manifest["timing"]["shards_computed"] == 7
    assert not list(out.glob(".progress/*/part-*.json"))  # the part state is superseded
    # more parts than shards: the extra part writes nothing, still counts as done
    small = [*SYNTH[:6], "--num-clips", 2, "--num-eval-clips", 0, "--clips-per-shard", 1]
    capsys.readouterr()
    assert run_cli(*small, "--out", tmp_path / "small", "--part", "3/3") == 0
    assert "this part has no shards" in capsys.readouterr().out
    for part in (1, 2):
        assert run_cli(*small, "--out", tmp_path / "small", "--part", f"{part}/3") == 0
    assert main(["prepare", "--merge", "--out", str(tmp_path / "small")]) == 0
    assert json.loads((tmp_path / "small" / "manifest.json").read_text())["splits"]["train"]["num_clips"] == 2


def test_assignment_is_round_robin_over_the_splits_shards():
    assert prepare.parts.assign([8, 3], (1, 3)) == [[0, 3, 6], [1]]
    assert prepare.parts.assign([8, 3], (3, 3)) == [[2, 5], [0]]
    assert prepare.parts.assign([2], (3, 3)) == [[]]
    assert prepare.parts.assign([2, 1], None) == [[0, 1], [0]]
    every = [prepare.parts.assign([5, 0, 4], (i, 4)) for i in range(1, 5)]
    for s, n in enumerate([5, 0, 4]):  # each shard in exactly one part
        assert sorted(k for part in every for k in part[s]) == list(range(n))
    assert prepare.parts.strip_part(["bat-jax", "prepare", "--part", "2/3", "--out", "o", "--part=1/2"]) == [
        "bat-jax",
        "prepare",
        "--out",
        "o",
    ]
