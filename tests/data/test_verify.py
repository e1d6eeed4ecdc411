"""`bat-jax verify DIR`: a clean prepared folder passes; bit rot, missing, truncated shards, bad records and
manifest counts that disagree are each named on their own line; exit 0 / 1 / 2."""

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from bat_jax.cli import main
from bat_jax.data import records, shards

SYNTH = ["--source", "synthetic", "--min-seconds", "0.3", "--max-seconds", "0.8", "--no-progress"]
TRAIN = [f"train/train-0000{k}-of-00003.arrayrecord" for k in range(3)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "clean"
    args = [*SYNTH, "--num-clips", 6, "--num-eval-clips", 2, "--clips-per-shard", 2, "--workers", 1]
    assert main(["prepare", *map(str, args), "--out", str(out)]) == 0
    return out


@pytest.fixture
def out(prepared, tmp_path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    return copy


def verify(out: Path, capsys, *flags) -> tuple[int, list[str]]:
    capsys.readouterr()
    status = main(["verify", str(out), *flags])
    return status, capsys.readouterr().out.splitlines()


def problems(lines: list[str]) -> list[str]:
    return [line for line in lines if not line.startswith(("bat-jax verify:", "  "))]


def edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("flags", [(), ("--quick",)])
def test_clean_folder_exits_0(out, capsys, flags):
    status, lines = verify(out, capsys, *flags)
    assert status == 0
    assert lines == [f"bat-jax verify: {out}: 2 splits, 4 shards, 8 records: all good"]


@pytest.mark.parametrize("where", [0.25, 0.5, 0.9])
def test_bit_flipped_shard_is_named(out, capsys, where):
    path = out / TRAIN[1]
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)
    data[at : at + 2] = bytes(b ^ 0xFF for b in data[at : at + 2])
    path.write_bytes(bytes(data))  # same size
    status, lines = verify(out, capsys)
    assert status == 1
    found = problems(lines)
    assert found and all(line.startswith((TRAIN[1], "split train")) for line in found)
    assert any("checksum mismatch" in line for line in found)
    assert lines[-2].endswith("in 1 shard")


def test_missing_shard_is_named(out, capsys):
    (out / TRAIN[2]).unlink()
    status, lines = verify(out, capsys)
    assert status == 1
    found = problems(lines)
    assert found[0] == f"{TRAIN[2]}: missing (listed in manifest.json)"
    assert found[1:] == ["split train: its shards hold 4 records, manifest.json says 6 clips"]


def test_truncated_shard_is_named(out, capsys):
    path = out / TRAIN[0]
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[: size - 1000])
    status, lines = verify(out, capsys)
    assert status == 1
    found = problems(lines)
    assert found[0] == f"{TRAIN[0]}: size {size - 1000} bytes, manifest.json says {size}"
    assert all(line.startswith((TRAIN[0], "split train")) for line in found)


def test_manifest_count_mismatch_is_named(out, capsys):
    def more_clips(manifest):
        manifest["splits"]["eval"]["num_clips"] = 3
        manifest["splits"]["train"]["shards"][0]["num_records"] = 5

    edit_manifest(out, more_clips)
    status, lines = verify(out, capsys)
    assert status == 1
    assert problems(lines) == [
        f"{TRAIN[0]}: 2 records, manifest.json says 5",
        "split eval: its shards hold 2 records, manifest.json says 3 clips",
    ]


def test_records_that_break_the_manifest_are_named_with_their_index(out, capsys):
    # a shard whose bytes are intact (its checksum is in the manifest) but whose second record has a label
    # outside the vocabulary: the writer's bug, not bit rot
    path = out / TRAIN[1]
    spec = np.zeros((20, 128), np.float16)
    clips = [records.Clip(spec, 20, "a", (1,)), records.Clip(spec, 20, "b", (3, 12))]
    writer = shards.ShardWriter(path)
    for clip in clips:
        writer.write(records.encode(clip))
    size = writer.commit()

    def rewritten(manifest):
        manifest["splits"]["train"]["shards"][1].update(bytes=size, sha256=shards.sha256_file(path))

    edit_manifest(out, rewritten)
    status, lines = verify(out, capsys)
    assert status == 1
    found = problems(lines)
    assert found[0] == f"{TRAIN[1]} record 1: labels [12] outside the vocabulary [0, 12)"
    assert len(found) == 2 and found[1].startswith("split train: its records hold ")  # 40 frames now
    edit_manifest(out, lambda m: m.update(n_mels=64))
    status, lines = verify(out, capsys)
    assert status == 1
    assert f"{TRAIN[0]} record 0: spec shape" in "\n".join(lines) and "expected [frames, 64]" in lines[0]


@pytest.mark.parametrize("manifest", [None, "{not json", '{"splits": {}}'])
def test_missing_or_unreadable_manifest(out, capsys, manifest):
    if manifest is None:
        (out / "manifest.json").unlink()
    else:
        (out / "manifest.json").write_text(manifest)
    status, lines = verify(out, capsys)
    assert status == 1
    assert problems(lines)[0].startswith("manifest.json: ")


SHARD_KEYS = "path, num_records, bytes, sha256"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5", "expected an object with the keys n_mels, label_vocabulary, splits, clip; found a number 5"),
        ("[]", "expected an object with the keys n_mels, label_vocabulary, splits, clip; found an array []"),
        ('{"splits": []}', "expected the keys n_mels, label_vocabulary, splits, clip; missing ['n_mels', "),
    ],
    ids=["5", "[]", "splits-only"],
)
def test_manifest_that_is_not_an_object_is_a_problem_not_a_traceback(out, capsys, text, expected):
    (out / "manifest.json").write_text(text)
    status, lines = verify(out, capsys)
    assert status == 1
    assert problems(lines)[0].startswith(f"manifest.json: {expected}")


def _set(path: str, value):
    """An edit of the manifest: set the value at a dotted path ("splits.train.shards.1")."""

    def edit(manifest):
        *parents, last = path.split(".")
        for key in parents:
            manifest = manifest[int(key)] if isinstance(manifest, list) else manifest[key]
        manifest[int(last) if isinstance(manifest, list) else last] = value

    return edit


@pytest.mark.parametrize(
    "path, value, expected",
    [
        ("splits", [], "splits: expected an object of split name -> entry, found an array []"),
        ("splits.train", 3, "splits.train: expected an object with shards, num_clips, total_frames, found "),
        (
            "splits.train.shards",
            {},
            "splits.train.shards: expected an array of shard entries, found an object",
        ),
        (
            "splits.train.shards.1",
            "train/x.arrayrecord",
            f"splits.train.shards[1]: expected an object with {SHARD_KEYS}, found a string "
            '"train/x.arrayrecord"',
        ),
        (
            "splits.eval.shards.0.bytes",
            "12",
            "splits.eval.shards[0].bytes: expected a whole number, found a string",
        ),
        ("splits.eval.shards.0.path", None, "splits.eval.shards[0].path: expected a string, found null"),
        ("n_mels", "128", 'n_mels: expected a whole number, found a string "128"'),
        ("clip", [], "clip: expected an object (mode, frames...), found an array []"),
    ],
    ids=lambda v: v if isinstance(v, str) and "expected" not in v and "/" not in v else "",
)
def test_damaged_manifest_is_a_problem_not_a_traceback(out, capsys, path, value, expected):
    edit_manifest(out, _set(path, value))
    for flags in ((), ("--quick",)):
        status, lines = verify(out, capsys, *flags)
        assert status == 1
        assert len(problems(lines)) == 1 and problems(lines)[0].startswith(f"manifest.json: {expected}")


def test_shard_hashes_are_reported_in_manifest_order_whatever_order_they_finish_in(out, capsys, monkeypatch):
    # two rotten shards; the first one listed is hashed slowest, so its hash is ready last
    for name in (TRAIN[0], TRAIN[2]):
        path = out / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    real, finished = shards.sha256_file, []

    def slow_for_the_first(path):
        time.sleep(0.5 if path.name == Path(TRAIN[0]).name else 0.0)
        finished.append(path.name)
        return real(path)

    monkeypatch.setattr(shards, "sha256_file", slow_for_the_first)
    status, lines = verify(out, capsys, "--quick")
    assert status == 1
    assert finished[-1] == Path(TRAIN[0]).name  # the hashes finished out of order (in threads)
    wheres = [line.split(": ")[0] for line in problems(lines)]
    assert wheres == sorted(wheres, key=lambda w: [*TRAIN, "split train"].index(w))  # manifest order
    mismatched = [line.split(": ")[0] for line in problems(lines) if "checksum mismatch" in line]
    assert mismatched == [TRAIN[0], TRAIN[2]]


def test_bad_usage_exits_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "DIR: expected a folder written by `bat-jax prepare`" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(["verify", str(tmp_path / "file")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["verify"])
    assert e.value.code == 2


def test_help_teaches_what_is_checked(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = capsys.readouterr().out
    for needle in (
        "sha256",
        "every record",
        "n_mels",
        "Exit status: 0",
        "bat-jax verify data/esc50",
        "--quick",
    ):
        assert needle in text
