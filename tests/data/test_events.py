"""Sound-event annotations: the records' optional `events`, `frame_targets` / `hop_seconds`, `bat-jax prepare
--events-csv` (rules, line-numbered errors, the manifest's events entry) and `--synthetic-events`, and the
loaders' frame_labels, which must equal frame_targets of the true events."""

import hashlib
import math
from pathlib import Path

import jax
import msgpack
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bat_jax.audio import synthetic
from bat_jax.cli import main
from bat_jax.data import frame_targets, hop_seconds, pipeline, prepare, records, sources
from tests.data.prepared import read_split, run_cli, wav

PATCH = 16  # frames per time patch (BAT)
TARGET_FRAMES = 320  # 3.2 s: 20 time patches, every clip below fits
HOP = 0.01


def targets_of(events, num_classes: int) -> np.ndarray:
    """frame_targets of (onset, offset, class) triples over the loaders' TARGET_FRAMES."""
    times = np.asarray([e[:2] for e in events], np.float64).reshape(-1, 2)
    classes = np.asarray([e[2] for e in events], np.int64)
    return frame_targets(times, classes, num_classes, TARGET_FRAMES // PATCH, PATCH, HOP)


def check_loaders(out: Path, split: str, true_events: dict[int, tuple], num_classes: int) -> None:
    """Both loaders' frame_labels equal frame_targets of the true events of each record (by clip_index)."""
    paths = pipeline.shard_paths(out, split)
    common = dict(target_frames=TARGET_FRAMES, num_classes=num_classes, frame_labels=(PATCH, HOP))
    seen = set()
    with pipeline.PretrainLoader(paths, global_batch_size=2, roll=False, seed=3, **common) as loader:
        for _ in range(len(true_events)):
            batch = next(loader)
            assert batch["frame_labels"].dtype == np.float32
            assert batch["frame_labels"].shape == (2, TARGET_FRAMES // PATCH, num_classes)
            for index, got in zip(batch["clip_index"], batch["frame_labels"], strict=True):
                np.testing.assert_array_equal(got, targets_of(true_events[int(index)], num_classes))
                seen.add(int(index))
    assert seen == set(true_events)  # every record came by
    loader = pipeline.EvalLoader(paths, global_batch_size=3, **common)
    rows = 0
    for batch in loader:
        for index, valid, got in zip(batch["clip_index"], batch["valid"], batch["frame_labels"], strict=True):
            expected = targets_of(true_events[int(index)], num_classes) if valid else 0 * got
            np.testing.assert_array_equal(got, expected)  # padding rows: all zero
            rows += int(valid)
    assert rows == len(true_events)


# ----------------------------------------------------------------------------------------------- records


def test_record_without_events_is_byte_identical_and_with_events_round_trips():
    spec = np.arange(12, dtype=np.float16).reshape(4, 3)
    plain = records.encode(records.Clip(spec, 4, "a", (1,)))
    before = {  # the record as bat-jax wrote it before events existed
        "v": 2,
        "spec": spec.tobytes(),
        "shape": [4, 3],
        "num_frames": 4,
        "clip_id": "a",
        "labels": [1],
    }
    assert plain == msgpack.packb(before, use_bin_type=True)
    assert "event_times" not in records.decode(plain) and "event_classes" not in records.decode(plain)

    events = ((0.5, 1.25, 2), (0, 0.1, 0))
    raw = records.encode(records.Clip(spec, 4, "a", (0, 2), events=events))
    stored = msgpack.unpackb(raw, raw=False)
    assert stored["v"] == records.FORMAT_VERSION == 2  # no version bump
    assert stored["events"] == [[0.5, 1.25, 2], [0.0, 0.1, 0]]
    out = records.decode(raw)
    assert out["event_times"].dtype == np.float32 and out["event_classes"].dtype == np.int32
    np.testing.assert_array_equal(out["event_times"], np.float32([[0.5, 1.25], [0.0, 0.1]]))
    np.testing.assert_array_equal(out["event_classes"], [2, 0])

    empty = records.encode(records.Clip(spec, 4, "a", events=()))  # annotated, no event
    assert msgpack.unpackb(empty, raw=False)["events"] == []
    out = records.decode(empty)
    assert out["event_times"].shape == (0, 2) and out["event_classes"].shape == (0,)


@pytest.mark.parametrize(
    "event,expected",
    [
        ((-0.1, 1.0, 0), "expected seconds with 0 <= onset < offset, found onset -0.1 and offset 1.0"),
        ((1.0, 1.0, 0), "expected seconds with 0 <= onset < offset, found onset 1.0 and offset 1.0"),
        ((2.0, 1.0, 0), "0 <= onset < offset, found onset 2.0 and offset 1.0"),
        ((0.0, math.nan, 0), "0 <= onset < offset, found onset 0.0 and offset nan"),
        ((0.0, "1", 0), "0 <= onset < offset, found onset 0.0 and offset '1'"),
        ((0.0, 1.0, -1), "expected a class index that is an int >= 0, found -1"),
        ((0.0, 1.0, 1.5), "expected a class index that is an int >= 0, found 1.5"),
        ((0.0, 1.0, True), "expected a class index that is an int >= 0, found True"),
        ((0.0, 1.0), "expected (onset, offset, class), found (0.0, 1.0)"),
    ],
)
def test_bad_events_are_refused_naming_the_clip(event, expected):
    spec = np.zeros((4, 3), np.float16)
    with pytest.raises(ValueError, match=r"^clip 'x': event 1: ") as e:
        records.encode(records.Clip(spec, 4, "x", events=((0.0, 0.5, 0), event)))
    assert expected in str(e.value)
    stored = msgpack.unpackb(records.encode(records.Clip(spec, 4, "x", events=())), raw=False)
    stored["events"] = [[0.0, 0.5, 0], list(event)]
    with pytest.raises(ValueError, match=r"^shard record 'x': event 1: "):
        records.decode(msgpack.packb(stored, use_bin_type=True))


# --------------------------------------------------------------------------------- frame_targets, hop


def test_frame_targets_on_hand_made_events_and_boundaries():
    # patch centres at (t + 0.5) * 16 * 0.01 s: 0.08, 0.24, 0.40, 0.56, 0.72, 0.88
    events = [
        (0.08, 0.24, 0),  # onset exactly at centre 0 counts, offset exactly at centre 1 does not: t = 0
        (0.25, 0.56, 1),  # centre 2 only (0.24 < onset, offset = centre 3 excluded)
        (0.30, 0.90, 1),  # centres 2..5, overlapping the event above (same class: still 1)
        (0.41, 0.55, 2),  # between two centres: nothing
        (0.0, 0.0801, 2),  # centre 0
        (0.88, 5.0, 0),  # from centre 5 past the last patch
    ]
    got = targets_of(events, 3)[:6]
    expected = np.zeros((6, 3), np.float32)
    expected[0, 0] = expected[5, 0] = 1
    expected[2:6, 1] = 1
    expected[0, 2] = 1
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(targets_of(events, 3)[6:], np.zeros((14, 3)) + [1, 0, 0])  # up to 5 s
    assert frame_targets(np.zeros((0, 2)), np.zeros((0,), int), 4, 5, 16, 0.01).shape == (5, 4)
    assert not frame_targets(np.zeros((0, 2)), np.zeros((0,), int), 4, 5, 16, 0.01).any()
    with pytest.raises(ValueError, match=r"expected event classes in \[0, 2\), found \[0, 2\]"):
        frame_targets([[0.0, 1.0], [0.0, 1.0]], [0, 2], 2, 4, 16, 0.01)


def test_frame_targets_equals_a_plain_loop_on_random_events():
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 3, (40, 2)), axis=1).astype(np.float32)  # [k, 2]
    classes = rng.integers(0, 5, 40)
    for patch_frames, hop in ((16, 0.01), (4, 0.02), (1, 0.016)):
        got = frame_targets(times, classes, 5, 30, patch_frames, hop)
        expected = np.zeros((30, 5), np.float32)
        for t in range(30):
            centre = np.float32((t + 0.5) * patch_frames * hop)
            for (onset, offset), c in zip(times, classes, strict=True):
                expected[t, c] = max(expected[t, c], float(onset <= centre < offset))
        np.testing.assert_array_equal(got, expected)


def test_hop_seconds_of_both_frontends():
    for name in ("bat", "kaldi"):
        manifest = {"frontend": prepare.Frontend.create(name).describe()}
        assert hop_seconds(manifest) == pytest.approx(0.01)
    kaldi = prepare.Frontend.create("kaldi", frame_shift_ms=20.0).describe()
    assert hop_seconds({"frontend": kaldi}) == pytest.approx(0.02)
    with pytest.raises(
        ValueError, match=r"expected front-end 'bat' or 'kaldi' in the manifest, found 'mfcc'"
    ):
        hop_seconds({"frontend": {"name": "mfcc", "params": {}}})
    with pytest.raises(ValueError, match=r"expected a manifest with frontend.params"):
        hop_seconds({})


# ------------------------------------------------------------------------------------- synthetic truth

# sha256 (first 16 hex) of make_clip's waves before make_clip_events existed: (multilabel, index) -> hash
MAKE_CLIP_GOLDEN = {
    (False, 0): "91bcc77186ec25df",
    (False, 7): "04d939b2260e85e9",
    (False, 1_000_000): "b0e5a231186461fa",
    (True, 0): "485bb8ceaa2a1e45",
    (True, 13): "9df21784d8b2a725",
}
MAKE_CLIP_LABELS = {(False, 0): (6,), (False, 7): (2,), (False, 1_000_000): (0,), (True, 0): (6, 9, 11)}


def test_make_clip_is_unchanged_and_make_clip_events_adds_the_truth():
    for (multilabel, index), digest in MAKE_CLIP_GOLDEN.items():
        config = synthetic.SyntheticConfig(
            num_clips=20, multilabel=multilabel, min_seconds=1.0, max_seconds=3.0
        )
        wave, labels = synthetic.make_clip(index, config)
        assert hashlib.sha256(wave.tobytes()).hexdigest()[:16] == digest
        assert labels == MAKE_CLIP_LABELS.get((multilabel, index), labels)
        wave2, labels2, events = synthetic.make_clip_events(index, config)
        assert wave2.tobytes() == wave.tobytes() and labels2 == labels
        assert tuple(sorted({c for _, _, c in events})) == labels and list(events) == sorted(events)
        for onset, offset, _ in events:
            assert 0 <= onset < offset <= wave.size / config.sample_rate
            assert round(onset * config.sample_rate) / config.sample_rate == onset  # whole samples


# ------------------------------------------------------------------------------------------ events CSV

HEADER = "filename,start,end,event_label,annotator\n"
EVENTS = {  # true events: path -> (onset, offset, label)
    "a.wav": ((0.08, 0.40, "dog"), (0.3, 1.7, "bird")),
    "b.wav": ((0.5, 0.9, "dog"),),
    "sub/c.wav": ((0.0, 1.5, "cat"), (0.24, 0.56, "dog")),
    "e.wav": (),  # annotated, no event
}
COLUMNS = "filename,start,end,event_label"


@pytest.fixture(scope="module")
def events_folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("events")
    root = tmp / "audio"
    for i, (name, seconds) in enumerate(
        (("a.wav", 2.0), ("b.wav", 1.0), ("sub/c.wav", 1.5), ("d.wav", 1.0), ("e.wav", 1.2))
    ):
        wav(root / name, seconds, freq=300.0 + 100 * i)
    rows = [f"{path},{on},{off},{label},x" for path, events in EVENTS.items() for on, off, label in events]
    rows.insert(1, "e.wav,,,,x")
    csv_path = tmp / "events.csv"
    csv_path.write_text(HEADER + "".join(r + "\n" for r in rows))
    out = tmp / "out"
    args = ("--source", "folder", "--input", root, "--events-csv", csv_path, "--events-columns", COLUMNS)
    assert run_cli(*args, "--out", out, "--clips-per-shard", "2") == 0
    return out, csv_path, args


def test_events_csv_goes_into_records_and_the_manifest(events_folder):
    out, csv_path, args = events_folder
    manifest, clips = read_split(out)
    assert manifest["label_vocabulary"] == ["bird", "cat", "dog"]  # the sorted set of event labels
    index = {name: i for i, name in enumerate(manifest["label_vocabulary"])}
    assert [c["clip_id"] for c in clips] == ["a.wav", "b.wav", "e.wav", "sub/c.wav"]
    for clip in clips:
        true = sorted((on, off, index[label]) for on, off, label in EVENTS[clip["clip_id"]])
        np.testing.assert_array_equal(clip["event_times"], np.float32([e[:2] for e in true]).reshape(-1, 2))
        np.testing.assert_array_equal(clip["event_classes"], [e[2] for e in true])
        assert tuple(clip["labels"]) == tuple(sorted({e[2] for e in true}))  # labels = classes of events
    assert manifest["splits"]["train"]["events"] == {
        "source": "events_csv",
        "file": str(csv_path.resolve()),
        "column_names": COLUMNS.split(","),
        "num_events": 5,
        "num_clips_without_events": 1,
    }
    assert "events" in manifest["record_fields"] and "onset" in manifest["record_fields"]["events"]
    (skip,) = manifest["skipped"]
    assert skip["source"] == "d.wav" and skip["kind"] == sources.NO_EVENTS == "no events"
    assert main(["verify", str(out)]) == 0
    assert run_cli(*args, "--out", out, "--clips-per-shard", "2") == 0  # resumes
    assert read_split(out)[0]["splits"]["train"]["events"]["num_events"] == 5


def test_events_csv_loaders_frame_labels_match_the_true_events(events_folder):
    out, _, _ = events_folder
    manifest, clips = read_split(out)
    assert hop_seconds(manifest) == HOP
    index = {name: i for i, name in enumerate(manifest["label_vocabulary"])}
    true = {
        i: tuple((on, off, index[label]) for on, off, label in EVENTS[clip["clip_id"]])
        for i, clip in enumerate(clips)
    }
    check_loaders(out, "train", true, len(index))


def test_frame_labels_are_placed_like_labels_on_a_mesh(events_folder):
    out, _, _ = events_folder
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    loader = pipeline.EvalLoader(
        pipeline.shard_paths(out, "train"),
        global_batch_size=len(jax.devices()),
        target_frames=TARGET_FRAMES,
        num_classes=3,
        frame_labels=(PATCH, HOP),
        sharding=sharding,
    )
    (batch,) = list(loader)
    frame_labels = batch["frame_labels"]
    assert isinstance(frame_labels, jax.Array) and frame_labels.shape == (len(jax.devices()), 20, 3)
    assert frame_labels.sharding.spec == batch["labels"].sharding.spec
    assert not np.asarray(frame_labels)[4:].any()  # 4 clips, the rest padding


def test_loader_frame_labels_argument_checks(events_folder):
    out, _, _ = events_folder
    paths = pipeline.shard_paths(out, "train")
    common = dict(global_batch_size=2, target_frames=TARGET_FRAMES)
    with pytest.raises(ValueError, match=r"frame_labels need roll=False .* found roll=True"):
        pipeline.PretrainLoader(paths, num_classes=3, frame_labels=(PATCH, HOP), **common)
    with pytest.raises(ValueError, match=r"frame_labels need num_classes .* found num_classes=None"):
        pipeline.EvalLoader(paths, frame_labels=(PATCH, HOP), **common)
    with pytest.raises(
        ValueError, match=r"expected target_frames a multiple of frame_labels' patch_frames 48"
    ):
        pipeline.EvalLoader(paths, num_classes=3, frame_labels=(48, HOP), **common)
    with pytest.raises(ValueError, match=r"expected frame_labels' hop_seconds a positive number, found 0"):
        pipeline.PretrainLoader(paths, num_classes=3, roll=False, frame_labels=(PATCH, 0), **common)


def events_csv_case(tmp_path: Path, body: str) -> tuple[Path, Path, Path]:
    root = tmp_path / "audio"
    wav(root / "a.wav", 0.3)
    csv_path = tmp_path / "events.csv"
    csv_path.write_text(body)
    return root, csv_path, tmp_path / "out"


@pytest.mark.parametrize(
    "bad_row,expected",
    [
        ("a.wav,abc,1.0,dog", "line 3: expected the onset as a number of seconds >= 0, found 'abc'"),
        ("a.wav,-0.5,1.0,dog", "line 3: expected the onset as a number of seconds >= 0, found '-0.5'"),
        ("a.wav,0.5,inf,dog", "line 3: expected the offset as a number of seconds >= 0, found 'inf'"),
        ("a.wav,1.0,0.5,dog", "line 3: expected onset < offset, found onset 1.0 and offset 0.5"),
        ("a.wav,0.5,0.5,dog", "line 3: expected onset < offset, found onset 0.5 and offset 0.5"),
        ("a.wav,0.5,,dog", "line 3: expected onset, offset and label all given (an event) or all empty"),
        ("a.wav,0.5,1.0", "line 3: expected four cells path,onset,offset,label"),
        (",0.5,1.0,dog", "line 3: expected a path in column 1"),
    ],
)
def test_bad_events_csv_values_are_one_line_errors_naming_the_line(tmp_path, capsys, bad_row, expected):
    root, csv_path, out = events_csv_case(tmp_path, f"path,onset,offset,label\na.wav,0,0.1,dog\n{bad_row}\n")
    assert run_cli("--source", "folder", "--input", root, "--events-csv", csv_path, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"bat-jax prepare: error: {csv_path}, {expected}") and err.count("\n") == 1
    assert not out.exists()  # refused before any work


def test_events_csv_layouts(tmp_path, capsys):
    # no header: the first row is already a data row; a header under other names needs --events-columns
    root, csv_path, out = events_csv_case(tmp_path, "a.wav,0.0,0.2,dog\n")
    assert run_cli("--source", "folder", "--input", root, "--events-csv", csv_path, "--out", out) == 0
    assert read_split(out)[1][0]["event_classes"].tolist() == [0]
    csv_path.write_text("file,on,off,class\na.wav,0,1,dog\n")
    assert run_cli("--source", "folder", "--input", root, "--events-csv", csv_path, "--out", out) == 2
    assert "name its columns with --events-columns PATH,ONSET,OFFSET,LABEL" in capsys.readouterr().err
    args = ("--source", "folder", "--input", root, "--events-csv", csv_path, "--out", out)
    assert run_cli(*args, "--events-columns", "file,on,off,label") == 2
    assert (
        "expected a header row naming the columns ['file', 'on', 'off', 'label']" in capsys.readouterr().err
    )
    assert run_cli(*args, "--events-columns", "file,on,off") == 2
    assert "--events-columns: expected four names PATH,ONSET,OFFSET,LABEL" in capsys.readouterr().err


def test_events_csv_option_conflicts(tmp_path, capsys):
    root, csv_path, out = events_csv_case(tmp_path, "path,onset,offset,label\na.wav,0,0.1,dog\n")
    folder = ("--source", "folder", "--input", root, "--out", out)
    cases = [
        (("--events-csv", csv_path, "--labels-csv", csv_path), "expected either --events-csv"),
        (("--events-csv", csv_path, "--labels-from-dir"), "or --labels-from-dir, found both"),
        (("--events-columns", "a,b,c,d"), "expected --events-csv FILE with those columns, found none"),
        (("--events-csv", csv_path, "--csv-columns", "a,b"), "for --events-csv use --events-columns"),
    ]
    for extra, expected in cases:
        assert run_cli(*folder, *extra) == 2
        assert expected in capsys.readouterr().err
    assert run_cli("--source", "synthetic", "--events-csv", csv_path, "--out", out) == 2
    assert "--events-csv belongs to --source folder, found --source synthetic" in capsys.readouterr().err
    assert run_cli(*folder, "--synthetic-events") == 2
    assert (
        "--synthetic-events belongs to --source synthetic, found --source folder" in capsys.readouterr().err
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------- synthetic events

SYNTH = ("--source", "synthetic", "--min-seconds", "1", "--max-seconds", "3", "--multilabel", "--seed", "2")


def test_synthetic_events_records_manifest_and_loaders(tmp_path):
    out = tmp_path / "out"
    assert run_cli(*SYNTH, "--num-clips", 4, "--num-eval-clips", 2, "--synthetic-events", "--out", out) == 0
    config = synthetic.SyntheticConfig(num_clips=4, multilabel=True, seed=2, min_seconds=1, max_seconds=3)
    num_classes = len(synthetic.CLASS_NAMES)
    for split, first in (("train", 0), ("eval", sources.SYNTHETIC_EVAL_INDEX)):
        manifest, clips = read_split(out, split)
        truth = {i: synthetic.make_clip_events(first + i, config) for i in range(len(clips))}
        for i, clip in enumerate(clips):
            _, labels, events = truth[i]
            np.testing.assert_array_equal(clip["event_times"], np.float32([e[:2] for e in events]))
            np.testing.assert_array_equal(clip["event_classes"], [e[2] for e in events])
            assert tuple(clip["labels"]) == labels
        assert manifest["splits"][split]["events"] == {
            "source": "synthetic",
            "num_events": sum(len(t[2]) for t in truth.values()),
            "num_clips_without_events": 0,
        }
        check_loaders(out, split, {i: t[2] for i, t in truth.items()}, num_classes)
    assert main(["verify", str(out)]) == 0


def test_synthetic_without_events_is_unchanged_refuses_resume_with_them_and_frame_labels(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(*SYNTH, "--num-clips", 2, "--num-eval-clips", 0, "--out", out) == 0
    manifest, clips = read_split(out)
    assert "events" not in manifest["splits"]["train"] and "events" not in manifest["record_fields"]
    assert "synthetic_events" not in manifest["splits"]["train"]["source"]  # older outputs still resume
    assert all("event_times" not in c for c in clips)
    capsys.readouterr()
    assert run_cli(*SYNTH, "--num-clips", 2, "--num-eval-clips", 0, "--synthetic-events", "--out", out) == 2
    err = capsys.readouterr().err
    assert "prepared from other inputs or settings" in err and "synthetic_events" in err
    shard = manifest["splits"]["train"]["shards"][0]["path"]
    with pytest.raises(pipeline.ShardError) as e:
        pipeline.EvalLoader(
            pipeline.shard_paths(out, "train"),
            global_batch_size=2,
            target_frames=TARGET_FRAMES,
            num_classes=12,
            frame_labels=(PATCH, HOP),
        )
    message = str(e.value)
    assert message.startswith(f"shard {out / shard}: record 0 of that shard")
    assert "expected event annotations (bat-jax prepare --events-csv or --synthetic-events)" in message


def test_help_documents_events_and_verify_checks_event_classes(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for phrase in (
        "--events-csv",
        "--events-columns",
        "--synthetic-events",
        "DCASE",
        "path,onset,offset,label",
    ):
        assert phrase in text
    from bat_jax.data import verify

    spec = np.zeros((4, 128), np.float16)
    clip = records.decode(records.encode(records.Clip(spec, 4, "a", (1,), events=((0.0, 1.0, 5),))))
    expect = verify.Expect(n_mels=128, num_classes=3, fixed_frames=None)
    assert verify._record_problem(clip, expect) == "event classes [5] outside the vocabulary [0, 3)"
    clip = records.decode(records.encode(records.Clip(spec, 4, "a", (1,), events=((0.0, 1.0, 2),))))
    assert verify._record_problem(clip, expect) is None
