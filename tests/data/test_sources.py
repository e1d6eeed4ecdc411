"""Folder source bad inputs: listing (symlinks, vanished, un-stat-able files, unreadable folders), the labels
CSV rules, --labels-from-dir on a flat folder, truncated WAVs. One test per input, fed exactly that input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from bat_jax.audio import io as audio_io
from bat_jax.cli import main
from bat_jax.data import prepare, sources
from bat_jax.data.sources import SourceError

SR = 16000
REPO = Path(__file__).resolve().parents[2]


def wav(path: Path, seconds: float = 0.3) -> Path:
    """A 16-bit PCM sine wave at 16 kHz."""
    t = np.arange(round(seconds * SR)) / SR
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR, subtype="PCM_16")
    return path


def run_cli(*args) -> int:
    return main(["prepare", *map(str, args), "--workers", "1", "--no-progress"])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def plan_files(plan) -> dict[str, list[str]]:
    return {s.name: [t.source for t in s.tasks] for s in plan.splits}


def plan_skips(plan) -> dict[str, tuple[str, str]]:
    return {s.source: (s.kind, s.reason) for split in plan.splits for s in split.skipped}


# ---------------------------------------------------------------------------------------------- listing


def test_dangling_symlink_is_skipped_with_its_reason_and_the_rest_written(tmp_path, capsys):
    root, out = tmp_path / "audio", tmp_path / "out"
    wav(root / "a.wav")
    os.symlink(root / "gone.wav", root / "u_dangling.wav")
    assert run_cli("--source", "folder", "--input", root, "--out", out) == 0
    m = manifest(out)
    assert m["splits"]["train"]["num_clips"] == 1 and m["splits"]["train"]["num_skipped"] == 1
    [skip] = m["skipped"]
    assert skip["source"] == "u_dangling.wav" and skip["kind"] == "broken symlink"
    assert "gone.wav" in skip["reason"] and "No such file" in skip["reason"]
    assert "broken symlink: 1" in capsys.readouterr().out  # counted in the summary


def test_file_that_vanishes_between_listing_and_stat_is_skipped(tmp_path, monkeypatch):
    root = tmp_path / "audio"
    wav(root / "a.wav")
    wav(root / "v.wav")
    walk = os.walk

    def walk_then_delete(top, *args, **kwargs):  # v.wav is listed, then removed before it is stat'ed
        for folder, dirs, names in walk(top, *args, **kwargs):
            if (Path(folder) / "v.wav").exists():
                (Path(folder) / "v.wav").unlink()
            yield folder, dirs, names

    monkeypatch.setattr(os, "walk", walk_then_delete)
    plan = sources.folder_source(root)
    assert plan_files(plan) == {"train": ["a.wav"]}
    assert plan_skips(plan)["v.wav"][0] == "missing file"


def test_file_that_vanishes_between_planning_and_reading_is_skipped(tmp_path):
    root, out = tmp_path / "audio", tmp_path / "out"
    wav(root / "a.wav")
    wav(root / "v.wav")
    plan = sources.folder_source(root)
    (root / "v.wav").unlink()
    prepare.prepare(plan, out, prepare.Frontend.create("bat"), workers=1, progress=False)
    m = manifest(out)
    assert m["splits"]["train"]["num_clips"] == 1
    assert [(s["source"], s["kind"]) for s in m["skipped"]] == [("v.wav", "missing file")]


def test_symlinked_folders_are_followed_once_and_loops_skipped(tmp_path):
    root, outside = tmp_path / "audio", tmp_path / "elsewhere"
    wav(root / "real/a.wav")
    wav(outside / "b.wav")
    os.symlink(outside, root / "linked")  # a folder outside --input: followed
    os.symlink(root / "real", root / "same")  # a second way into real/: listed once
    os.symlink(root, root / "real/up")  # a loop back to --input: not followed
    plan = sources.folder_source(root)
    assert plan_files(plan) == {"train": ["linked/b.wav", "real/a.wav"]}
    skips = plan_skips(plan)
    assert skips["real/up"][0] == "symlink loop" and "'.'" in skips["real/up"][1]
    assert skips["same"][0] == "duplicate folder" and "'real'" in skips["same"][1]


# Tests run as root in CI, and root reads any folder whatever its mode. A fresh interpreter (no threads, so
# no fork from the JAX-threaded test process) drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from its
# bounding set, then execs the real command, which obeys file modes like any user.
UNPRIVILEGED = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; 24 = PR_CAPBSET_DROP\n"
    "    if libc.prctl(24, cap, 0, 0, 0) != 0:\n"
    "        raise OSError(ctypes.get_errno(), f'prctl(PR_CAPBSET_DROP, {cap}) failed')\n"
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])\n"
)


def run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    """`python *args` in a subprocess that cannot bypass file permissions, also when the tests run as root."""
    prefix = [sys.executable, "-c", UNPRIVILEGED] if os.geteuid() == 0 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow  # runs the listing in a subprocess
def test_unreadable_subfolder_and_unstatable_file_are_listed_as_skipped(tmp_path):
    root = tmp_path / "audio"
    wav(root / "a.wav")
    wav(root / "locked/b.wav")
    wav(root / "nostat/c.wav")
    (root / "locked").chmod(0o000)  # cannot be listed
    (root / "nostat").chmod(0o644)  # listed (read), but its files cannot be stat'ed (no search)
    code = (
        "import json, sys; from bat_jax.data import sources; p = sources.folder_source(sys.argv[1]); "
        "print(json.dumps([[t.source for s in p.splits for t in s.tasks], "
        "[[k.source, k.kind, k.reason] for s in p.splits for k in s.skipped]]))"
    )
    try:
        done = run_unprivileged("-c", code, str(root))
    finally:
        (root / "locked").chmod(0o755)
        (root / "nostat").chmod(0o755)
    assert done.returncode == 0, done.stderr
    files, skipped = json.loads(done.stdout)
    assert files == ["a.wav"]
    skips = {source: (kind, reason) for source, kind, reason in skipped}
    assert skips["locked"][0] == "unreadable folder" and "Permission denied" in skips["locked"][1]
    assert skips["nostat/c.wav"][0] == "unreadable file" and "Permission denied" in skips["nostat/c.wav"][1]


# ------------------------------------------------------------------------------------------ labels CSV


def folder_with(tmp_path: Path, csv_bytes: bytes, names=("a.wav", "b.wav")) -> tuple[Path, Path]:
    root = tmp_path / "audio"
    for name in names:
        wav(root / name)
    (tmp_path / "labels.csv").write_bytes(csv_bytes)
    return root, tmp_path / "labels.csv"


def test_csv_header_other_than_path_labels_is_refused_before_any_work(tmp_path, capsys):
    root, csv_path = folder_with(tmp_path, b"file,class\na.wav,dog\nb.wav,cat\n")
    with pytest.raises(SourceError) as e:
        sources.folder_source(root, labels_csv=csv_path)
    message = str(e.value)
    assert (
        str(csv_path) in message and "['file', 'class']" in message and "--csv-columns file,class" in message
    )
    out = tmp_path / "out"
    assert run_cli("--source", "folder", "--input", root, "--labels-csv", csv_path, "--out", out) == 2
    assert "--csv-columns" in capsys.readouterr().err and not out.exists()  # nothing written
    # the same CSV with its columns named is read
    plan = sources.folder_source(root, labels_csv=csv_path, csv_columns=("file", "class"))
    assert plan.vocabulary == ["cat", "dog"] and [t.labels for t in plan.splits[0].tasks] == [(1,), (0,)]


ESC50_CSV = (
    b"filename,fold,target,category,esc10,src_file,take\n"
    b"a.wav,1,0,dog,True,100032,A\n"
    b"b.wav,1,14,chirping_birds,False,100038,A\n"
)


def test_esc50_csv_without_csv_columns_is_refused_and_read_with_them(tmp_path):
    root, csv_path = folder_with(tmp_path, ESC50_CSV)
    with pytest.raises(SourceError) as e:
        sources.folder_source(root, labels_csv=csv_path)
    message = str(e.value)
    assert str(csv_path) in message and "found 7" in message and "'fold'" in message
    assert "--csv-columns PATH,LABELS" in message
    plan = sources.folder_source(root, labels_csv=csv_path, csv_columns=("filename", "category"))
    assert plan.vocabulary == ["chirping_birds", "dog"]
    assert [(t.source, t.labels) for t in plan.splits[0].tasks] == [("a.wav", (1,)), ("b.wav", (0,))]


def test_csv_columns_need_a_header_naming_both(tmp_path):
    root, csv_path = folder_with(tmp_path, b"a.wav,dog\nb.wav,cat\n")
    with pytest.raises(SourceError, match=r"header row naming the columns \['filename', 'category'\]"):
        sources.folder_source(root, labels_csv=csv_path, csv_columns=("filename", "category"))


def test_headerless_two_column_csv_and_a_row_with_a_third_cell(tmp_path):
    root, csv_path = folder_with(tmp_path, b"a.wav,dog\nb.wav,\n")  # b.wav: no labels
    plan = sources.folder_source(root, labels_csv=csv_path)
    assert [(t.source, t.labels) for t in plan.splits[0].tasks] == [("a.wav", (0,)), ("b.wav", ())]
    (tmp_path / "labels.csv").write_bytes(b"a.wav,dog\nb.wav,cat,extra\n")
    with pytest.raises(SourceError, match=r"labels.csv, line 2: expected two cells path,labels.*found 3"):
        sources.folder_source(root, labels_csv=csv_path)


def test_csv_matching_no_audio_file_is_refused_unless_allow_unlabelled(tmp_path):
    root, csv_path = folder_with(tmp_path, b"path,labels\naudio/a.wav,dog\naudio/b.wav,cat\n")
    with pytest.raises(SourceError) as e:
        sources.folder_source(root, labels_csv=csv_path)
    message = str(e.value)
    assert str(csv_path) in message and "2 rows" in message
    assert "'audio/a.wav'" in message and "'a.wav'" in message and "--allow-unlabelled" in message
    plan = sources.folder_source(root, labels_csv=csv_path, allow_unlabelled=True)
    assert [(t.source, t.labels) for t in plan.splits[0].tasks] == [("a.wav", ()), ("b.wav", ())]
    out = tmp_path / "out"
    common = ["--source", "folder", "--input", root, "--labels-csv", csv_path, "--out", out]
    assert run_cli(*common) == 2 and not out.exists()
    assert run_cli(*common, "--allow-unlabelled") == 0 and manifest(out)["splits"]["train"]["num_clips"] == 2


@pytest.mark.parametrize(
    "csv_bytes, columns", [(b"path,labels\n", None), (b"file,class\n", ("file", "class"))]
)
def test_header_only_csv_is_refused_unless_allow_unlabelled(tmp_path, capsys, csv_bytes, columns):
    root, csv_path = folder_with(tmp_path, csv_bytes)
    with pytest.raises(SourceError) as e:
        sources.folder_source(root, labels_csv=csv_path, csv_columns=columns)
    message = str(e.value)
    assert message.startswith(f"{csv_path}: ") and "no data rows" in message
    assert "--allow-unlabelled" in message
    plan = sources.folder_source(root, labels_csv=csv_path, csv_columns=columns, allow_unlabelled=True)
    assert [(t.source, t.labels) for t in plan.splits[0].tasks] == [("a.wav", ()), ("b.wav", ())]
    out = tmp_path / "out"
    flags = ["--csv-columns", ",".join(columns)] if columns else []
    capsys.readouterr()
    assert run_cli("--source", "folder", "--input", root, "--labels-csv", csv_path, *flags, "--out", out) == 2
    assert "no data rows" in capsys.readouterr().err and not out.exists()  # nothing written


def test_absolute_csv_path_through_a_symlinked_subfolder_is_accepted(tmp_path):
    root, outside = tmp_path / "audio", tmp_path / "elsewhere"
    wav(root / "a.wav")
    wav(outside / "c.wav")
    os.symlink(outside, root / "linked")  # a subfolder of --input that is a link to a folder outside it
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text(f"path,labels\n{root / 'linked' / 'c.wav'},dog\n{root / 'a.wav'},cat\n")
    plan = sources.folder_source(root, labels_csv=csv_path)
    assert plan.vocabulary == ["cat", "dog"]
    assert [(t.source, t.labels) for t in plan.splits[0].tasks] == [("a.wav", (0,)), ("linked/c.wav", (1,))]
    # the same file named by its real path is outside --input: refused, naming the line
    csv_path.write_text(f"path,labels\n{outside / 'c.wav'},dog\n")
    with pytest.raises(SourceError, match=r"labels.csv, line 2: expected a path inside .* found '/"):
        sources.folder_source(root, labels_csv=csv_path)


def test_csv_not_in_utf8_names_file_line_and_flag_and_reads_with_csv_encoding(tmp_path, capsys):
    root, csv_path = folder_with(
        tmp_path, "path,labels\na.wav,dog\ncafé.wav,bird\n".encode("latin-1"), names=("a.wav", "café.wav")
    )
    with pytest.raises(SourceError) as e:
        sources.folder_source(root, labels_csv=csv_path)
    message = str(e.value)
    assert f"{csv_path}, line 3, byte 4" in message and "0xe9" in message and "--csv-encoding" in message
    plan = sources.folder_source(root, labels_csv=csv_path, csv_encoding="latin-1")
    assert [(t.source, t.labels) for t in plan.splits[0].tasks] == [("a.wav", (1,)), ("café.wav", (0,))]
    out = tmp_path / "out"
    common = ["--source", "folder", "--input", root, "--labels-csv", csv_path, "--out", out]
    assert run_cli(*common) == 2 and "line 3" in capsys.readouterr().err
    assert run_cli(*common, "--csv-encoding", "latin-1") == 0
    assert manifest(out)["label_vocabulary"] == ["bird", "dog"]
    with pytest.raises(SourceError, match="--csv-encoding: expected a Python codec name"):
        sources.folder_source(root, labels_csv=csv_path, csv_encoding="klingon")


def test_csv_with_a_utf8_byte_order_mark_is_read(tmp_path):
    root, csv_path = folder_with(tmp_path, "\ufeffpath,labels\na.wav,dog\nb.wav,cat\n".encode())
    plan = sources.folder_source(root, labels_csv=csv_path)
    assert [(t.source, t.labels) for t in plan.splits[0].tasks] == [("a.wav", (1,)), ("b.wav", (0,))]


def test_folder_flags_belong_to_the_folder_source(capsys, tmp_path):
    for flag in (["--csv-encoding", "latin-1"], ["--allow-unlabelled"]):
        assert run_cli("--source", "synthetic", "--out", tmp_path / "o", *flag) == 2
        assert f"{flag[0]} belongs to --source folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- labels from dir


def test_labels_from_dir_on_a_flat_folder_is_refused(tmp_path):
    root = tmp_path / "audio"
    wav(root / "a.wav")
    wav(root / "b.wav")
    with pytest.raises(SourceError, match=r"--labels-from-dir: expected audio files inside class subfolders"):
        sources.folder_source(root, labels_from_dir=True)
    plan = sources.folder_source(root, labels_from_dir=True, allow_unlabelled=True)
    assert [t.labels for t in plan.splits[0].tasks] == [(), ()]
    # with --split-from-subdir, a split whose files all sit directly in it is refused, naming it
    wav(root / "train/dog/c.wav")
    wav(root / "eval/d.wav")
    (root / "a.wav").unlink()
    (root / "b.wav").unlink()
    with pytest.raises(
        SourceError, match=r"class subfolders of .*eval \(e.g. dog/1.wav\), found all 1 directly in it"
    ):
        sources.folder_source(root, labels_from_dir=True, split_from_subdir=True)
    out = tmp_path / "out"
    assert run_cli("--source", "folder", "--input", root / "eval", "--labels-from-dir", "--out", out) == 2
    assert not out.exists()


# ---------------------------------------------------------------------------------------- truncated WAV


def truncated_wav(path: Path) -> tuple[int, int]:
    """A 1 s WAV cut to about half its bytes: (frames the header promises, frames the data holds)."""
    wav(path, 1.0)
    data = path.read_bytes()
    path.write_bytes(data[: 44 + 2 * 7000])  # 44-byte header, 7000 16-bit frames
    return SR, 7000


def test_truncated_wav_is_loaded_and_reported(tmp_path):
    path = tmp_path / "t.wav"
    promised, held = truncated_wav(path)
    assert audio_io.wav_header_frames(str(path)) == promised
    wave, notes = audio_io.load_with_notes(path)
    assert wave.shape == (held,)
    np.testing.assert_array_equal(wave, sf.read(path, dtype="float32")[0])
    np.testing.assert_array_equal(audio_io.load(path), wave)  # load(path) unchanged
    [(kind, reason)] = notes
    assert kind == "truncated" and f"{held} frames read" in reason and f"promises {promised}" in reason
    assert audio_io.load_with_notes(wav(tmp_path / "whole.wav"))[1] == ()
    sf.write(tmp_path / "f.flac", np.zeros(100, np.float32), SR)
    assert audio_io.wav_header_frames(str(tmp_path / "f.flac")) is None


def test_truncated_wav_is_kept_and_listed_as_truncated_in_the_manifest(tmp_path, capsys):
    root, out = tmp_path / "audio", tmp_path / "out"
    wav(root / "a.wav")
    promised, held = truncated_wav(root / "t.wav")
    task = sources.ClipTask(0, "t.wav", "t.wav", (0,))
    wave, labels, notes = sources.FileLoader(str(root))(task)
    assert wave.shape == (held,) and labels == (0,) and notes[0][0] == "truncated"
    assert len(sources.FileLoader(str(root))(sources.ClipTask(0, "a.wav", "a.wav"))) == 2  # nothing to say
    assert run_cli("--source", "folder", "--input", root, "--out", out) == 0
    m = manifest(out)
    assert m["splits"]["train"]["num_clips"] == 2 and m["skipped"] == []
    [note] = m["notes"]
    assert note["source"] == "t.wav" and note["kind"] == "truncated"
    assert f"{held} frames read" in note["reason"] and f"promises {promised}" in note["reason"]
    assert "truncated" in capsys.readouterr().out
