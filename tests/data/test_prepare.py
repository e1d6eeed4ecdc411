"""`bat-jax prepare`: sources, front-end bucketing, shards, manifest, skips, determinism, resume, TFDS."""

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader
from google.protobuf import json_format
from tensorflow_datasets.core.proto import feature_pb2

from bat_jax.audio import synthetic
from bat_jax.audio.frontend import kaldi_fbank, logmel
from bat_jax.cli import main
from bat_jax.data import prepare, records, shards, sources

SR = 16000
HOP = 160
N_MELS = 128
# Tiny synthetic clips: 0.3-1.2 s, so every clip fits in the first two front-end buckets.
SYNTH = ["--source", "synthetic", "--min-seconds", "0.3", "--max-seconds", "1.2", "--no-progress"]
# Expected features. The bucketed computation equals logmel / kaldi_fbank (first tests below); using it here
# avoids one jit compilation per clip length.
BAT = prepare.Frontend.create("bat")
KALDI = prepare.Frontend.create("kaldi")


def run_cli(*args) -> int:
    return main(["prepare", *map(str, args)])


def read_split(out: Path, split: str) -> tuple[dict, list[dict]]:
    """The manifest and every record of `split`, in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    clips = []
    for shard in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(str(out / shard["path"]))
        assert reader.num_records() == shard["num_records"]
        clips += [records.decode(r) for r in reader.read_all()]
        reader.close()
    return manifest, clips


def shard_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*/*.arrayrecord"))}


def wav(path: Path, seconds: float, rate: int = SR, freq: float = 440.0) -> np.ndarray:
    """Write a sine wave as 16-bit PCM and return what a 16 kHz load of it gives."""
    t = np.arange(round(seconds * rate)) / rate
    wave = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, rate, subtype="PCM_16")
    pcm = sf.read(path, dtype="float32")[0]
    return pcm if rate == SR else librosa.resample(pcm, orig_sr=rate, target_sr=SR, res_type="soxr_hq")


def test_help_explains_sources_outputs_and_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for phrase in (
        "folder",
        "tfds",
        "synthetic",
        "manifest.json",
        "num_frames",
        "--clip-seconds",
        "speech_commands",
        "sha256",
        "bat-jax verify OUT",
        "exit status 130",
    ):
        assert phrase in text


@pytest.mark.parametrize(
    "flag,value,expected",
    [
        ("--clip-seconds", "inf", "expected a finite number of seconds > 0, found inf"),
        ("--clip-seconds", "nan", "expected a finite number of seconds > 0, found nan"),
        ("--clip-seconds", "-1", "expected a finite number of seconds > 0, found -1"),
        ("--clip-seconds", "0", "expected a finite number of seconds > 0, found 0"),
        ("--clips-per-shard", "0", "expected a whole number >= 1, found 0"),
        ("--num-shards", "0", "expected a whole number >= 1, found 0"),
        ("--workers", "0", "expected a whole number >= 1, found 0"),
        ("--workers", "two", "expected a whole number >= 1, found two"),
        ("--num-clips", "0", "expected a whole number >= 1, found 0"),
        ("--num-eval-clips", "-1", "expected a whole number >= 0, found -1"),
        ("--max-seconds", "inf", "expected a finite number of seconds > 0, found inf"),
    ],
)
def test_bad_flag_values_are_one_line_errors_before_any_work(tmp_path, capsys, flag, value, expected):
    with pytest.raises(SystemExit) as e:
        run_cli(*SYNTH, "--out", tmp_path / "out", flag, value)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"bat-jax prepare: error: {flag}: {expected}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lengths", [[513, 20320, 23456]])
def test_bucketed_frontends_equal_the_plain_frontends(lengths):
    rng = np.random.default_rng(0)
    for n in lengths:  # 20320 samples = 128 frames: exactly one bucket
        wave = (rng.standard_normal(n) * np.linspace(0.01, 1.0, n)).astype(np.float32)
        np.testing.assert_allclose(BAT.compute(wave), np.asarray(logmel(wave)), rtol=0, atol=1e-6)
        np.testing.assert_allclose(KALDI.compute(wave), np.asarray(kaldi_fbank(wave)), rtol=1e-5, atol=1e-4)
        assert BAT.frames(n) == n // HOP + 1 and KALDI.frames(n) == 1 + (n - 400) // HOP


def test_synthetic_end_to_end(tmp_path):
    out = tmp_path / "out"
    assert (
        run_cli(
            *SYNTH,
            "--num-clips",
            5,
            "--num-eval-clips",
            2,
            "--workers",
            1,
            "--clips-per-shard",
            3,
            "--out",
            out,
        )
        == 0
    )
    config = synthetic.SyntheticConfig(num_clips=5, min_seconds=0.3, max_seconds=1.2)
    manifest, clips = read_split(out, "train")
    assert manifest["format_version"] == records.FORMAT_VERSION
    assert manifest["label_vocabulary"] == list(synthetic.CLASS_NAMES)
    assert manifest["frontend"]["name"] == "bat" and manifest["frontend"]["params"]["hop_length"] == HOP
    assert manifest["clip"]["mode"] == "full" and manifest["sample_rate"] == SR
    assert manifest["command"] and manifest["bat_jax_version"] and manifest["timing"]["clips_computed"] == 7
    train = manifest["splits"]["train"]
    assert [s["path"] for s in train["shards"]] == [
        "train/train-00000-of-00002.arrayrecord",
        "train/train-00001-of-00002.arrayrecord",
    ]
    assert [s["num_records"] for s in train["shards"]] == [3, 2]
    assert train["num_clips"] == 5 and train["num_skipped"] == 0 and manifest["skipped"] == []
    assert train["total_frames"] == sum(int(c["num_frames"]) for c in clips)
    for index, clip in enumerate(clips):
        wave, labels = synthetic.make_clip(index, config)
        assert clip["clip_id"] == synthetic.clip_id(index, config)
        assert clip["spec"].dtype == np.float16 and clip["spec"].shape == (
            wave.size // HOP + 1,
            N_MELS,
        )
        assert clip["num_frames"] == wave.size // HOP + 1
        assert tuple(clip["labels"]) == labels
        np.testing.assert_allclose(clip["spec"], BAT.compute(wave), atol=1e-3)
    manifest, clips = read_split(out, "eval")
    eval_ids = [synthetic.clip_id(sources.SYNTHETIC_EVAL_INDEX + i, config) for i in range(2)]
    assert [c["clip_id"] for c in clips] == eval_ids and manifest["splits"]["eval"]["num_clips"] == 2


def make_folder(root: Path) -> dict[str, np.ndarray]:
    """Good clips (one at 22.05 kHz, one in a subfolder, one unlabeled) and broken files; a CSV."""
    waves = {
        "a.wav": wav(root / "a.wav", 0.5),
        "sub/b.flac": wav(root / "sub/b.flac", 0.8, freq=1000.0),
        "c.wav": wav(root / "c.wav", 0.4, rate=22050),
        "unlisted.wav": wav(root / "unlisted.wav", 0.3),
    }
    (root / "corrupt.flac").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "empty.wav").write_bytes(b"")
    (root / "notes.wav").write_text("this is not audio\n")
    (root / "readme.txt").write_text("not an audio extension: ignored\n")
    with open(root / "labels.csv", "w", newline="") as f:
        rows = [("path", "labels"), ("a.wav", "dog"), ("sub/b.flac", "cat;dog"), ("c.wav", "bird")]
        rows += [("missing.wav", "dog"), ("corrupt.flac", "cat"), ("empty.wav", "cat"), ("notes.wav", "cat")]
        csv.writer(f).writerows(rows)
    return waves


def test_folder_with_csv_skips_broken_files_and_lists_them(tmp_path):
    root, out = tmp_path / "audio", tmp_path / "out"
    waves = make_folder(root)
    assert run_cli("--source", "folder", "--input", root, "--labels-csv", root / "labels.csv", "--out", out,
                   "--workers", 1, "--no-progress") == 0  # fmt: skip
    manifest, clips = read_split(out, "train")
    assert manifest["label_vocabulary"] == ["bird", "cat", "dog"]
    got = {c["clip_id"]: c for c in clips}
    assert list(got) == ["a.wav", "c.wav", "sub/b.flac", "unlisted.wav"]  # sorted relative paths
    expected_labels = {"a.wav": [2], "c.wav": [0], "sub/b.flac": [1, 2], "unlisted.wav": []}
    for name, wave in waves.items():
        assert got[name]["labels"].tolist() == expected_labels[name]
        assert got[name]["num_frames"] == wave.size // HOP + 1
        np.testing.assert_allclose(got[name]["spec"], BAT.compute(wave), atol=2e-3)
    skipped = {s["source"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"missing.wav", "corrupt.flac", "empty.wav", "notes.wav"}
    assert skipped["missing.wav"]["kind"] == "missing file" and "line 5" in skipped["missing.wav"]["reason"]
    assert skipped["empty.wav"]["kind"] == "empty file"
    assert skipped["notes.wav"]["kind"] == skipped["corrupt.flac"]["kind"] == "unreadable audio"
    assert all(s["split"] == "train" and s["reason"] for s in manifest["skipped"])
    assert manifest["splits"]["train"]["num_skipped"] == 4 and manifest["splits"]["train"]["num_clips"] == 4
    # --strict: the same output (nothing to recompute) now exits non-zero because inputs were skipped
    assert run_cli("--source", "folder", "--input", root, "--labels-csv", root / "labels.csv", "--out", out,
                   "--workers", 1, "--no-progress", "--strict") == 1  # fmt: skip


def test_folder_require_labels_vocab_file_and_splits_added_by_separate_runs(tmp_path, capsys):
    root, out = tmp_path / "audio", tmp_path / "out"
    wav(root / "train/x.wav", 0.3)
    wav(root / "train/y.wav", 0.3)
    wav(root / "eval/z.wav", 0.3)
    (root / "vocab.txt").write_text("zebra\ndog\ncat\n")
    (root / "train.csv").write_text("x.wav,cat;dog\n")  # no header row
    (root / "eval.csv").write_text("file,tags\nz.wav,zebra\n")
    common = ["--source", "folder", "--out", out, "--workers", 1, "--no-progress"]
    assert run_cli(*common, "--input", root / "train", "--labels-csv", root / "train.csv",
                   "--labels-vocab", root / "vocab.txt", "--require-labels") == 0  # fmt: skip
    manifest, clips = read_split(out, "train")
    assert manifest["label_vocabulary"] == ["zebra", "dog", "cat"]
    assert [(c["clip_id"], c["labels"].tolist()) for c in clips] == [("x.wav", [1, 2])]
    assert [(s["source"], s["kind"]) for s in manifest["skipped"]] == [("y.wav", "unlabeled")]
    # a second run adds split "eval" to the same output and reuses its vocabulary
    assert run_cli(*common, "--input", root / "eval", "--labels-csv", root / "eval.csv",
                   "--csv-columns", "file,tags", "--split", "eval") == 0  # fmt: skip
    manifest, clips = read_split(out, "eval")
    assert set(manifest["splits"]) == {"train", "eval"}
    assert [(c["clip_id"], c["labels"].tolist()) for c in clips] == [("z.wav", [0])]
    # other settings for an existing split are refused with a clear message, then allowed with --overwrite
    capsys.readouterr()
    assert run_cli(*common, "--input", root / "eval", "--split", "eval", "--frontend", "kaldi") == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("keep me")
    assert (
        run_cli("--source", "folder", "--input", root / "eval", "--out", tmp_path / "foreign", "--overwrite")
        == 2
    )
    assert (tmp_path / "foreign" / "thesis.tex").exists()


def test_split_from_subdir_with_labels_from_dir(tmp_path):
    root, out = tmp_path / "audio", tmp_path / "out"
    for rel in ("train/yes/1.wav", "train/no/2.wav", "eval/yes/3.wav", "eval/4.wav"):
        wav(root / rel, 0.3)
    args = ["--input", root, "--split-from-subdir", "--labels-from-dir", "--workers", 1, "--no-progress"]
    assert run_cli("--source", "folder", *args, "--out", out) == 0
    manifest, train = read_split(out, "train")
    _, evaluation = read_split(out, "eval")
    assert manifest["label_vocabulary"] == ["no", "yes"] and list(manifest["splits"]) == ["train", "eval"]
    assert [(c["clip_id"], c["labels"].tolist()) for c in train] == [
        ("train/no/2.wav", [0]),
        ("train/yes/1.wav", [1]),
    ]
    assert [(c["clip_id"], c["labels"].tolist()) for c in evaluation] == [
        ("eval/4.wav", []),
        ("eval/yes/3.wav", [1]),
    ]
    wav(root / "stray.wav", 0.3)  # a file outside the split folders is an error, not a silent skip
    assert run_cli("--source", "folder", *args, "--out", tmp_path / "other") == 2


@pytest.mark.slow  # spawns worker processes
def test_same_output_for_any_worker_count(tmp_path):
    args = [*SYNTH, "--num-clips", 6, "--num-eval-clips", 0, "--clips-per-shard", 4, "--multilabel"]
    assert run_cli(*args, "--workers", 2, "--out", tmp_path / "w2") == 0
    assert run_cli(*args, "--workers", 1, "--out", tmp_path / "w1") == 0
    a, b = shard_files(tmp_path / "w2"), shard_files(tmp_path / "w1")
    assert list(a) == ["train/train-00000-of-00002.arrayrecord", "train/train-00001-of-00002.arrayrecord"]
    assert a == b
    _, clips = read_split(tmp_path / "w2", "train")
    config = synthetic.SyntheticConfig(num_clips=6, multilabel=True, min_seconds=0.3, max_seconds=1.2)
    assert [tuple(c["labels"]) for c in clips] == [synthetic.make_clip(i, config)[1] for i in range(6)]


def test_resume_rewrites_only_missing_shards(tmp_path):
    out = tmp_path / "out"
    args = [
        *SYNTH,
        "--num-clips",
        6,
        "--num-eval-clips",
        0,
        "--clips-per-shard",
        2,
        "--workers",
        1,
        "--out",
        out,
    ]
    assert run_cli(*args) == 0
    clean = shard_files(out)
    manifest = json.loads((out / "manifest.json").read_text())
    names = [out / s["path"] for s in manifest["splits"]["train"]["shards"]]
    assert len(names) == 3
    os.utime(names[0], ns=(1_000_000_000, 1_000_000_000))  # a recognisable mtime
    # interruption: shard 1 was deleted, shard 2 was being written (only its .tmp exists, no .done.json)
    names[1].unlink()
    names[2].rename(names[2].with_name(names[2].name + ".tmp"))
    (out / ".progress" / "train" / (names[2].name + shards.DONE_SUFFIX)).unlink()
    (out / "manifest.json").unlink()
    assert run_cli(*args) == 0
    assert names[0].stat().st_mtime_ns == 1_000_000_000  # untouched
    assert shard_files(out) == clean and not list(out.glob("train/*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timing"]["clips_computed"] == 4 and manifest["timing"]["shards_reused"] == 1
    # a truncated shard (size differs from its .done.json) is rewritten too
    names[1].write_bytes(names[1].read_bytes()[:100])
    assert run_cli(*args) == 0
    assert shard_files(out) == clean and names[0].stat().st_mtime_ns == 1_000_000_000


def flip_bytes(path: Path, at: int, count: int = 4) -> None:
    """Bit rot: invert `count` bytes at offset `at`, keeping the file's size."""
    data = bytearray(path.read_bytes())
    data[at : at + count] = bytes(b ^ 0xFF for b in data[at : at + count])
    path.write_bytes(bytes(data))


def test_checksums_in_done_files_and_manifest_and_resume_recomputes_a_rotten_shard(tmp_path, capsys):
    out = tmp_path / "out"
    args = [*SYNTH, "--num-clips", 6, "--num-eval-clips", 0, "--clips-per-shard", 2, "--workers", 1]
    assert run_cli(*args, "--out", out) == 0
    clean = shard_files(out)
    manifest = json.loads((out / "manifest.json").read_text())
    listed = manifest["splits"]["train"]["shards"]
    for shard in listed:
        done = json.loads((out / ".progress" / (shard["path"] + shards.DONE_SUFFIX)).read_text())
        assert (
            shard["sha256"]
            == done["sha256"]
            == hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest()
        )
    rotten = out / listed[1]["path"]
    size = rotten.stat().st_size
    flip_bytes(rotten, size // 2)
    assert rotten.stat().st_size == size and shard_files(out) != clean
    capsys.readouterr()
    assert run_cli(*args, "--out", out) == 0
    summary = capsys.readouterr().out
    assert f"shard {listed[1]['path']} was bad (checksum mismatch" in summary
    assert summary.count("was bad") == 1
    assert shard_files(out) == clean
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["timing"]["shards_computed"] == 1 and manifest["timing"]["shards_reused"] == 2


def _noted_loader(task):
    """A loader that keeps every clip and notes the odd ones as truncated."""
    wave = np.sin(np.arange(4000 + 800 * task.index, dtype=np.float32) / 7.0)
    if task.index % 2:
        return wave, (0,), (("truncated", f"read {wave.size} frames, header says {2 * wave.size}"),)
    return wave, (1,)


def test_loader_notes_go_to_done_files_manifest_and_summary(tmp_path):
    tasks = [sources.ClipTask(i, f"clip{i}", f"files/clip{i}.wav") for i in range(5)]
    split = sources.SplitPlan("train", tasks, [], _noted_loader, "digest-of-five")
    plan = sources.SourcePlan("custom", {"kind": "custom"}, ["a", "b"], [split])
    result = prepare.prepare(plan, tmp_path / "out", BAT, clips_per_shard=3, progress=False)
    assert result.exit_status == 0
    manifest, clips = read_split(tmp_path / "out", "train")
    assert len(clips) == 5 and manifest["skipped"] == []
    expected = [
        {
            "split": "train",
            "source": f"files/clip{i}.wav",
            "kind": "truncated",
            "reason": f"read {4000 + 800 * i} frames, header says {2 * (4000 + 800 * i)}",
        }
        for i in (1, 3)
    ]
    assert manifest["notes"] == expected and manifest["splits"]["train"]["num_notes"] == 2
    progress = tmp_path / "out" / ".progress" / "train"
    done = [json.loads(p.read_text())["notes"] for p in sorted(progress.glob("*" + shards.DONE_SUFFIX))]
    assert done == [expected[:1], expected[1:]]
    summary = prepare.format_summary(result, tmp_path / "out")
    assert (
        "kept with notes (2;" in summary
        and "truncated: 2  (e.g. files/clip1.wav: read 4800 frames" in summary
    )


def _wave_only_loader(task):
    return np.zeros(8000, np.float32)  # forgot the labels


def _five_values_loader(task):
    return np.zeros(8000, np.float32), (0,), (), None, "extra"


def _bad_events_loader(task):
    return np.zeros(8000, np.float32), (0,), (), ((0.5, 0.2, 0),)  # onset after offset


def _bad_notes_loader(task):
    return np.zeros(8000, np.float32), (0,), ("truncated",)  # a note is a (kind, reason) pair


@pytest.mark.parametrize(
    "loader, found",
    [
        (
            _wave_only_loader,
            "(wave, labels), (wave, labels, notes) or (wave, labels, notes, events), found a value of type "
            "ndarray",
        ),
        (_five_values_loader, "found 5 values"),
        (_bad_notes_loader, "notes to be (kind, reason) string pairs, found ('truncated',)"),
        (
            _bad_events_loader,
            "events to be (onset s, offset s, class) triples or None, found ((0.5, 0.2, 0),)",
        ),
    ],
)
def test_loader_breaking_its_contract_fails_the_run_instead_of_skipping_every_clip(
    tmp_path, capsys, monkeypatch, loader, found
):
    tasks = [sources.ClipTask(i, f"clip{i}", f"files/clip{i}.wav") for i in range(3)]
    plan = sources.SourcePlan(
        "custom", {"kind": "custom"}, ["a"], [sources.SplitPlan("train", tasks, [], loader, "three")]
    )
    with pytest.raises(prepare.LoaderContractError) as e:
        prepare.prepare(plan, tmp_path / "api", BAT, progress=False)
    message = str(e.value)
    assert message.startswith(f"loader {loader.__name__} on 'files/clip0.wav': expected a loader")
    assert found in message and not list((tmp_path / "api").glob("train/*.arrayrecord"))
    # the command line: exit 2 with that one line, no manifest
    monkeypatch.setattr(prepare.cli, "plan_source", lambda args: plan)
    capsys.readouterr()
    assert run_cli(*SYNTH, "--workers", 1, "--out", tmp_path / "cli") == 2
    err = capsys.readouterr().err
    assert err == f"bat-jax prepare: error: {message}\n"
    assert not (tmp_path / "cli" / "manifest.json").exists()


def test_resume_hashes_finished_shards_in_threads_and_reports_them_in_order(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    args = [*SYNTH, "--num-clips", 6, "--num-eval-clips", 0, "--clips-per-shard", 2, "--workers", 1]
    assert run_cli(*args, "--out", out) == 0
    listed = [s["path"] for s in json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]]
    for path in (listed[0], listed[2]):
        flip_bytes(out / path, (out / path).stat().st_size // 2)
    real, finished = shards.sha256_file, []

    def slow_for_the_first(path):
        time.sleep(0.5 if path.name == Path(listed[0]).name else 0.0)
        finished.append(path.name)
        return real(path)

    monkeypatch.setattr(shards, "sha256_file", slow_for_the_first)
    capsys.readouterr()
    assert run_cli(*args, "--out", out) == 0
    summary = capsys.readouterr().out
    assert finished[2] == Path(listed[0]).name  # the resume's three hashes ran at once, the first ended last
    bad = [line.split()[1] for line in summary.splitlines() if "was bad (checksum mismatch" in line]
    assert bad == [listed[0], listed[2]]


def _done_files(out: Path) -> set[Path]:
    return set(out.glob(".progress/train/*" + shards.DONE_SUFFIX))


def _assert_done_shards_are_whole(out: Path) -> None:
    for done_path in _done_files(out):
        done = json.loads(done_path.read_text())
        shard = out / "train" / done_path.name.removesuffix(shards.DONE_SUFFIX)
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == done["sha256"]
        assert shards.count_records(shard) == done["num_records"]


def _interrupting_loader(task):
    """Every clip is kept; loading clip 2 (first of shard 1) sends SIGINT to this process, as Ctrl-C would."""
    if task.index == 2 and not os.environ.get("NO_INTERRUPT"):
        os.kill(os.getpid(), signal.SIGINT)
    return np.sin(np.arange(3000 + 500 * task.index, dtype=np.float32) / 9.0), (task.index % 2,)


def test_sigint_in_process_stops_between_clips_and_drops_the_open_shard(tmp_path, monkeypatch):
    tasks = [sources.ClipTask(i, f"c{i}", f"c{i}.wav") for i in range(6)]
    plan = sources.SourcePlan(
        "custom",
        {"kind": "custom"},
        ["a", "b"],
        [sources.SplitPlan("train", tasks, [], _interrupting_loader, "d6")],
    )
    out = tmp_path / "out"

    # A handler of the caller's (like Python's own, Ctrl-C raises KeyboardInterrupt), whatever an earlier test
    # in this worker left installed: prepare must put exactly it back. The original returns at the end.
    def callers(signum, frame):
        raise KeyboardInterrupt

    original = signal.signal(signal.SIGINT, callers)
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare(plan, out, BAT, clips_per_shard=2, progress=False)
        assert signal.getsignal(signal.SIGINT) is callers  # restored
    finally:
        signal.signal(signal.SIGINT, original)
    assert [p.name for p in _done_files(out)] == ["train-00000-of-00003.arrayrecord" + shards.DONE_SUFFIX]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["train-00000-of-00003.arrayrecord"]
    assert not (out / "manifest.json").exists()
    monkeypatch.setenv("NO_INTERRUPT", "1")
    assert prepare.prepare(plan, out, BAT, clips_per_shard=2, progress=False).exit_status == 0
    assert prepare.prepare(plan, tmp_path / "clean", BAT, clips_per_shard=2, progress=False).exit_status == 0
    assert shard_files(out) == shard_files(tmp_path / "clean")


def _children(pid: int) -> list[int]:
    """Child process ids of `pid` (Linux /proc)."""
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pids: list[int], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow  # subprocesses that spawn worker processes
def test_sigint_to_a_two_worker_prepare_stops_cleanly_every_time(tmp_path):
    out = tmp_path / "out"
    args = [*SYNTH, "--max-seconds", "0.6", "--num-clips", 64, "--num-eval-clips", 0, "--clips-per-shard", 2]
    command = [sys.executable, "-m", "bat_jax.cli", "prepare", *map(str, args), "--out", str(out)]
    for attempt in range(3):
        before = _done_files(out)
        proc = subprocess.Popen([*command, "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not _done_files(out) - before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"attempt {attempt}: the run ended before a new shard was done"
        children = _children(proc.pid)  # the two workers (and multiprocessing's resource tracker)
        assert len(children) >= 2
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
        assert _gone(children), f"attempt {attempt}: worker processes still alive"
        assert proc.returncode == 130, (attempt, stdout.decode(), stderr.decode())
        assert stderr.decode().strip().endswith("interrupted; run the same command again to finish")
        assert "Traceback" not in stderr.decode() and "Exception ignored" not in stderr.decode()
        assert not list(out.glob("train/*.tmp"))
        _assert_done_shards_are_whole(out)
        assert len(_done_files(out)) < 32  # stopped early
    finish = subprocess.run([*command, "--workers", "2"], capture_output=True, timeout=300)
    assert finish.returncode == 0, finish.stderr.decode()
    assert run_cli(*args, "--workers", 1, "--out", tmp_path / "clean") == 0
    assert shard_files(out) == shard_files(tmp_path / "clean")
    ours = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert ours == json.loads((tmp_path / "clean" / "manifest.json").read_text())["splits"]["train"]["shards"]


def test_clip_seconds_cuts_waves_and_pads_features_after_normalisation(tmp_path):
    out = tmp_path / "out"
    assert (
        run_cli(
            *SYNTH,
            "--num-clips",
            6,
            "--num-eval-clips",
            0,
            "--clip-seconds",
            0.7,
            "--workers",
            1,
            "--out",
            out,
        )
        == 0
    )
    manifest, clips = read_split(out, "train")
    fixed = round(0.7 * SR) // HOP + 1
    assert manifest["clip"]["mode"] == "fixed" and manifest["clip"]["frames"] == fixed == 71
    config = synthetic.SyntheticConfig(num_clips=6, min_seconds=0.3, max_seconds=1.2)
    lengths = []
    for index, clip in enumerate(clips):
        wave = synthetic.make_clip(index, config)[0][: round(0.7 * SR)]  # cut before the front-end
        n = wave.size // HOP + 1
        lengths.append(n)
        assert clip["spec"].shape == (fixed, N_MELS) and clip["num_frames"] == n
        np.testing.assert_allclose(clip["spec"][:n], BAT.compute(wave), atol=1e-3)
        assert not clip["spec"][n:].any()  # zero padding after min-max normalisation
    assert min(lengths) < fixed and max(lengths) == fixed  # both cut and padded clips were exercised


def test_kaldi_frontend_writes_raw_fbank(tmp_path):
    out = tmp_path / "out"
    assert (
        run_cli(
            *SYNTH,
            "--num-clips",
            3,
            "--num-eval-clips",
            0,
            "--frontend",
            "kaldi",
            "--workers",
            1,
            "--out",
            out,
        )
        == 0
    )
    manifest, clips = read_split(out, "train")
    assert manifest["frontend"]["name"] == "kaldi" and "(2 std)" in manifest["frontend"]["normalization"]
    assert manifest["frontend"]["params"]["num_mel_bins"] == N_MELS
    config = synthetic.SyntheticConfig(num_clips=3, min_seconds=0.3, max_seconds=1.2)
    for index, clip in enumerate(clips):
        wave = synthetic.make_clip(index, config)[0]
        expected = KALDI.compute(wave)  # raw log-mel, not normalised
        assert clip["num_frames"] == 1 + (wave.size - 400) // HOP == expected.shape[0]
        np.testing.assert_allclose(clip["spec"].astype(np.float32), expected, rtol=1e-3, atol=1e-2)


# ------------------------------------------------------------------------------------------------ TFDS

TFDS_RATE = 8000
TFDS_NAMES = ["dog", "cat", "bird"]


def tfds_audio(i: int) -> np.ndarray:
    t = np.arange(2400 + 400 * i) / TFDS_RATE  # 0.3 s, 0.35 s, ...
    return (8000 * np.sin(2 * np.pi * (300 + 100 * i) * t)).astype(np.int16)


def build_tiny_tfds(data_dir: Path) -> Path:
    """A 2-split TFDS dataset in array_record format, audio stored as int16 at 8 kHz (built without TF)."""
    with tfds.core.registered.skip_registration():

        class TinyAudio(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            # A one-part module name: TFDS looks up a packaged builder's files through importlib_resources,
            # which it imports lazily and does not install.
            __module__ = "tiny_audio"

            def _info(self):
                features = {
                    "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                    "label": tfds.features.ClassLabel(names=TFDS_NAMES),
                    "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=TFDS_NAMES)),
                }
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

            def _split_generators(self, dl_manager):
                return {
                    "train": self._generate_examples(range(4)),
                    "test": self._generate_examples(range(4, 6)),
                }

            def _generate_examples(self, indices):
                for i in indices:
                    yield (
                        f"k{i}",
                        {"audio": tfds_audio(i), "label": i % 3, "tags": sorted({i % 3, (i + 1) % 3})},
                    )

        TinyAudio(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir / "tiny_audio" / "1.0.0"


def as_audio_feature(dataset_dir: Path) -> None:
    """Rewrite features.json as TensorFlow would have written it for tfds.features.Audio(int16, 8 kHz)."""
    path = dataset_dir / "features.json"
    spec = json.loads(path.read_text())
    audio = feature_pb2.Feature(
        python_class_name="tensorflow_datasets.core.features.audio_feature.Audio",
        audio=feature_pb2.AudioFeature(
            shape=feature_pb2.Shape(dimensions=[-1]), dtype="int16", file_format="wav", sample_rate=TFDS_RATE,
            encoding="none",
        ),
    )  # fmt: skip
    spec["featuresDict"]["features"]["audio"] = json_format.MessageToDict(audio)
    path.write_text(json.dumps(spec))


def test_tfds_source_with_and_without_tensorflow_metadata(tmp_path):
    data_dir = tmp_path / "tfds"
    dataset_dir = build_tiny_tfds(data_dir)
    # the TF-free reader decodes items exactly as tfds.data_source does
    via_tfds = tfds.data_source("tiny_audio", split="train", data_dir=str(data_dir))
    via_files = sources.TfFreeTfdsSource(dataset_dir, "train")
    assert len(via_files) == len(via_tfds) == 4
    for i in range(4):
        a, b = via_tfds[i], via_files[i]
        np.testing.assert_array_equal(a["audio"], b["audio"])
        assert a["label"] == b["label"] and list(a["tags"]) == list(b["tags"])

    tfds_args = [
        "--source",
        "tfds",
        "--tfds-name",
        "tiny_audio",
        "--tfds-data-dir",
        data_dir,
        "--workers",
        1,
        "--no-progress",
    ]
    plain = tmp_path / "plain"  # a plain Tensor feature has no sample_rate: it is given
    assert (
        run_cli(*tfds_args, "--tfds-split", "train,test", "--tfds-sample-rate", TFDS_RATE, "--out", plain)
        == 0
    )
    manifest, clips = read_split(plain, "train")
    assert manifest["label_vocabulary"] == TFDS_NAMES and set(manifest["splits"]) == {"train", "test"}
    for i, clip in enumerate(clips):  # records follow the data source's order (TFDS shuffled the examples)
        item = via_tfds[i]
        wave = librosa.resample(item["audio"] / 32768.0, orig_sr=TFDS_RATE, target_sr=SR, res_type="soxr_hq")
        assert clip["clip_id"] == f"tiny_audio/train/{i}" and clip["labels"].tolist() == [item["label"]]
        assert clip["num_frames"] == wave.size // HOP + 1
        np.testing.assert_allclose(clip["spec"], BAT.compute(wave.astype(np.float32)), atol=2e-3)

    # the tfds.data_source reader through the library API gives the same records
    plan = sources.tfds_source(
        "tiny_audio", ["train"], data_dir=str(data_dir), sample_rate=TFDS_RATE, reader="tfds"
    )
    assert prepare.prepare(plan, tmp_path / "lib", BAT, progress=False).exit_status == 0
    assert shard_files(tmp_path / "lib") == {
        k: v for k, v in shard_files(plain).items() if k.startswith("train/")
    }

    as_audio_feature(dataset_dir)  # now tfds.data_source would need TensorFlow; the files are read directly
    audio = tmp_path / "audio"
    assert run_cli(*tfds_args, "--tfds-split", "train", "--tfds-label-key", "tags", "--out", audio) == 0
    manifest, tagged = read_split(audio, "train")
    assert manifest["splits"]["train"]["num_clips"] == 4
    assert [c["labels"].tolist() for c in tagged] == [sorted(via_tfds[i]["tags"]) for i in range(4)]
    assert all(len(c["labels"]) == 2 for c in tagged)
    for a, b in zip(clips, tagged, strict=True):
        np.testing.assert_array_equal(a["spec"], b["spec"])


def test_items_source_skips_bad_items_and_accepts_any_data_source(tmp_path):
    good = np.sin(np.arange(8000, dtype=np.float32) / 5.0)
    items = [{"audio": good, "label": 1}, {"audio": good[:100], "label": 0}, {"audio": good[:0], "label": 0}]
    plan = sources.items_source({"train": items}, vocabulary=["a", "b"], sample_rate=SR)
    result = prepare.prepare(plan, tmp_path / "out", prepare.Frontend.create("bat"), progress=False)
    assert result.exit_status == 0
    manifest, clips = read_split(tmp_path / "out", "train")
    assert [c["clip_id"] for c in clips] == ["items/train/0"] and clips[0]["labels"].tolist() == [1]
    assert [s["kind"] for s in manifest["skipped"]] == ["too short", "unreadable input"]
    nothing = sources.items_source({"train": items[1:]}, vocabulary=["a", "b"], sample_rate=SR)
    result = prepare.prepare(nothing, tmp_path / "none", prepare.Frontend.create("bat"), progress=False)
    assert result.exit_status == 1  # nothing usable was written


def test_shard_plan_is_fixed_by_the_counts():
    assert shards.plan_shards(5, clips_per_shard=2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert shards.plan_shards(5, num_shards=2) == [range(0, 2), range(2, 5)]
    assert shards.plan_shards(2, num_shards=4) == [range(0, 1), range(1, 2)]
    assert shards.plan_shards(0, clips_per_shard=3) == []
    assert shards.shard_name("train", 0, 4) == "train-00000-of-00004.arrayrecord"


def test_empty_output_dir_is_accepted_and_clean(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert run_cli(*SYNTH, "--num-clips", 1, "--num-eval-clips", 0, "--workers", 1, "--out", out) == 0
    assert sorted(p.name for p in out.iterdir()) == [".progress", "manifest.json", "train"]
    shutil.rmtree(out)
