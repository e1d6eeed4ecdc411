"""`bat-jax prepare --fold-column`: a per-clip fold from the labels CSV, in each record and in the manifest
(per split, in record order); the record field is optional (older records and runs without it unchanged);
errors for a column the CSV lacks, an empty cell, and the flag without a CSV."""

from pathlib import Path

import msgpack
import numpy as np
import pytest

from bat_jax.cli import main
from bat_jax.data import prepare, records
from bat_jax.probe import kfold_splits
from tests.data.prepared import read_split, run_cli, wav

ESC50_HEADER = "filename,fold,target,category,esc10,src_file,take\n"


def esc50_folder(tmp_path: Path, rows: list[str], files=None) -> tuple[Path, Path]:
    root = tmp_path / "audio"
    names = files if files is not None else [row.split(",")[0] for row in rows]
    for i, name in enumerate(names):
        wav(root / name, freq=300.0 + 100 * i)
    csv_path = tmp_path / "esc50.csv"
    csv_path.write_text(ESC50_HEADER + "".join(row + "\n" for row in rows))
    return root, csv_path


ROWS = [
    "1-a.wav,1,0,dog,True,1,A",
    "1-b.wav,1,1,cat,False,2,A",
    "2-a.wav,2,0,dog,True,3,A",
    "2-b.wav,2,1,cat,False,4,A",
    "3-a.wav,3,1,cat,False,5,A",
]


def esc50_args(root, csv_path, out, *more):
    return (
        "--source", "folder", "--input", root, "--labels-csv", csv_path,
        "--csv-columns", "filename,category", "--out", out, *more,
    )  # fmt: skip


def test_esc50_folds_go_into_records_and_the_manifest_in_record_order(tmp_path):
    root, csv_path = esc50_folder(tmp_path, ROWS, files=[r.split(",")[0] for r in ROWS] + ["extra.wav"])
    out = tmp_path / "out"
    assert run_cli(*esc50_args(root, csv_path, out, "--fold-column", "fold", "--clips-per-shard", "2")) == 0
    manifest, clips = read_split(out)
    assert [c["clip_id"] for c in clips] == ["1-a.wav", "1-b.wav", "2-a.wav", "2-b.wav", "3-a.wav"]
    assert [c["fold"] for c in clips] == [1, 1, 2, 2, 3]  # ints: every cell of the column is one
    folds = manifest["splits"]["train"]["folds"]
    assert folds == {
        "column": "fold",
        "values": [1, 2, 3],
        "num_clips": [2, 2, 1],
        "by_record": [1, 1, 2, 2, 3],
    }
    assert len(manifest["splits"]["train"]["shards"]) == 3  # by_record spans the shards in order
    assert "fold" in manifest["record_fields"]
    # the file the CSV does not list has no fold: skipped, with its reason
    (skip,) = manifest["skipped"]
    assert skip["source"] == "extra.wav" and skip["kind"] == prepare.NO_FOLD == "no fold"
    assert "--fold-column fold" in skip["reason"] and str(csv_path) in skip["reason"]
    # a probe takes each fold's records from the manifest alone
    assert [(f.value, f.test.tolist()) for f in kfold_splits(folds["by_record"])] == [
        (1, [0, 1]),
        (2, [2, 3]),
        (3, [4]),
    ]
    assert main(["verify", str(out)]) == 0  # records with a fold pass `bat-jax verify`
    # rerun: resumes (nothing recomputed), same manifest entry
    assert run_cli(*esc50_args(root, csv_path, out, "--fold-column", "fold", "--clips-per-shard", "2")) == 0
    assert read_split(out)[0]["splits"]["train"]["folds"] == folds


def test_without_fold_column_records_and_manifest_have_no_fold(tmp_path):
    root, csv_path = esc50_folder(tmp_path, ROWS[:2])
    out = tmp_path / "out"
    assert run_cli(*esc50_args(root, csv_path, out)) == 0
    manifest, clips = read_split(out)
    assert all("fold" not in c for c in clips)
    assert "folds" not in manifest["splits"]["train"] and "fold" not in manifest["record_fields"]
    assert "fold_column" not in manifest["splits"]["train"]["source"]  # older outputs still resume


def test_adding_a_fold_column_to_an_existing_output_is_refused_without_overwrite(tmp_path, capsys):
    root, csv_path = esc50_folder(tmp_path, ROWS[:2])
    out = tmp_path / "out"
    assert run_cli(*esc50_args(root, csv_path, out)) == 0
    capsys.readouterr()
    assert run_cli(*esc50_args(root, csv_path, out, "--fold-column", "fold")) == 2
    err = capsys.readouterr().err
    assert "prepared from other inputs or settings" in err and "fold_column" in err
    assert run_cli(*esc50_args(root, csv_path, out, "--fold-column", "fold", "--overwrite")) == 0
    assert read_split(out)[0]["splits"]["train"]["folds"]["by_record"] == [1, 1]


def test_string_folds_and_the_default_path_labels_header(tmp_path):
    root = tmp_path / "audio"
    for name in ("x.wav", "y.wav", "z.wav"):
        wav(root / name)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,labels,Split\nx.wav,dog,A\ny.wav,cat,b\nz.wav,cat,2\n")
    out = tmp_path / "out"
    common = ("--source", "folder", "--input", root, "--labels-csv", csv_path, "--out", out)
    assert run_cli(*common, "--fold-column", "split") == 0  # column names are case-insensitive
    manifest, clips = read_split(out)
    assert [c["fold"] for c in clips] == ["A", "b", "2"]  # not all integers: strings, as written
    assert manifest["splits"]["train"]["folds"]["values"] == ["2", "A", "b"]


def test_fold_column_absent_from_the_header_names_the_file_and_its_columns(tmp_path, capsys):
    root, csv_path = esc50_folder(tmp_path, ROWS[:2])
    out = tmp_path / "out"
    assert run_cli(*esc50_args(root, csv_path, out, "--fold-column", "folds")) == 2
    err = capsys.readouterr().err
    assert str(csv_path) in err and "expected a column 'folds' (--fold-column) in the header" in err
    assert "['filename', 'fold', 'target', 'category', 'esc10', 'src_file', 'take']" in err
    assert not out.exists()  # refused before any work


def test_empty_fold_cell_is_refused_naming_the_line(tmp_path, capsys):
    root, csv_path = esc50_folder(tmp_path, ["1-a.wav,1,0,dog,True,1,A", "1-b.wav, ,1,cat,False,2,A"])
    out = tmp_path / "out"
    assert run_cli(*esc50_args(root, csv_path, out, "--fold-column", "fold")) == 2
    err = capsys.readouterr().err
    assert (
        f"{csv_path}, line 3: expected a fold value in column 2 (fold, --fold-column), found an empty" in err
    )
    assert not out.exists()


def test_headerless_csv_with_fold_column_is_refused(tmp_path, capsys):
    root = tmp_path / "audio"
    wav(root / "a.wav")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("a.wav,dog\n")
    args = ("--source", "folder", "--input", root, "--labels-csv", csv_path, "--out", tmp_path / "out")
    assert run_cli(*args, "--fold-column", "fold") == 2
    err = capsys.readouterr().err
    assert "expected a header row naming the columns ['path', 'labels']" in err and "--fold-column" in err


def test_fold_column_needs_a_labels_csv_and_the_folder_source(tmp_path, capsys):
    root = tmp_path / "audio"
    wav(root / "dog" / "a.wav")
    out = tmp_path / "out"
    assert (
        run_cli(
            "--source", "folder", "--input", root, "--labels-from-dir", "--fold-column", "fold", "--out", out
        )
        == 2
    )
    assert "--fold-column fold: expected --labels-csv FILE with that column, found no --labels-csv" in (
        capsys.readouterr().err
    )
    assert run_cli("--source", "synthetic", "--fold-column", "fold", "--out", out) == 2
    assert "--fold-column belongs to --source folder, found --source synthetic" in capsys.readouterr().err


def test_record_fold_is_optional_and_round_trips():
    spec = np.zeros((4, 3), np.float16)
    plain = records.encode(records.Clip(spec, 4, "a"))
    assert "fold" not in msgpack.unpackb(plain, raw=False) and "fold" not in records.decode(plain)
    for fold in (3, "fold-A", 0):
        raw = records.encode(records.Clip(spec, 4, "a", (1,), fold))
        out = records.decode(raw)
        assert out["fold"] == fold and type(out["fold"]) is type(fold)
        assert msgpack.unpackb(raw, raw=False)["v"] == records.FORMAT_VERSION == 2  # no version bump
    with pytest.raises(
        ValueError, match=r"clip 'a': expected a fold that is an int or a str, found float 1.5"
    ):
        records.encode(records.Clip(spec, 4, "a", (), 1.5))
    bad = msgpack.unpackb(records.encode(records.Clip(spec, 4, "a", (), 1)), raw=False)
    bad["fold"] = [1]
    with pytest.raises(ValueError, match=r"shard record 'a': expected a fold that is an int or a str"):
        records.decode(msgpack.packb(bad, use_bin_type=True))
