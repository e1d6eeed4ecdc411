"""`bat-jax probe` end to end on small prepared folders (issue 8 §1, §3, §5): the workdir's contract, the
three split protocols, the loss chosen by the labels, and bad input refused before any compute."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from bat_jax import cli
from bat_jax.probe import run_probe
from bat_jax.probe.heads import ProbeConfigError
from tests.probe.helpers import clips, probe_config, tiny_encoder, write_prepared


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny")


@pytest.fixture(scope="module")
def three_splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "prepared"
    return write_prepared(
        root, {"train": clips(32, seed=0), "validation": clips(12, seed=1), "test": clips(16, seed=2)}
    )


def test_probe_command_writes_the_workdir_contract(tmp_path, encoder, three_splits, capsys, caplog):
    import jax

    workdir = tmp_path / "run"
    with jax.log_compiles(True), caplog.at_level(logging.WARNING, logger="jax._src.interpreters.pxla"):
        rc = cli.main(
            [
                "probe",
                "--config",
                "configs/probe/synthetic.py",
                "--workdir",
                str(workdir),
                "--no-progress",
                f"--config.encoder.path={encoder}",
                f"--config.data.root={three_splits}",
                "--config.data.test_split=test",
                "--config.frames=64",
                "--config.probes=cgp,lcgp,lp",
                "--config.probe.num_prototypes=16",
                "--config.train.steps=6",
                "--config.train.batch_size=8",
                "--config.train.eval_every=3",
                "--config.optim.warmup_steps=2",
            ]
        )
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert sorted(metrics) == ["cgp", "lcgp", "lp"]
    for entry in metrics.values():
        assert entry["test"]["num_examples"] == 16
        assert 0.0 <= entry["test"]["accuracy"] <= 1.0 and len(entry["test"]["per_class_ap"]) == 4
        assert entry["best_validation"]["step"] in (3, 6)
        assert entry["best_validation"]["num_examples"] == 12
    gates = json.loads((workdir / "gates.json").read_text())
    assert sorted(gates) == ["cgp", "lcgp"]
    for weights in gates.values():
        assert len(weights) == 2 and abs(sum(weights) - 1.0) < 1e-5
    assert (workdir / "gates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (workdir / "params" / "final").is_dir()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == {"train", "validation"}
    assert [r["step"] for r in rows if r["phase"] == "validation"] == [3, 6]
    resolved = json.loads((workdir / "config.json").read_text())["resolved"]
    assert resolved["protocol"] == "splits" and resolved["loss"] == "cross_entropy"
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling jit(probe_")]
    assert [m.split(" ")[1] for m in compiled] == ["jit(probe_train_step)", "jit(probe_eval_step)"], compiled
    assert "jit cache sizes: train" in capsys.readouterr().err
    # A finished workdir is not overwritten by accident.
    again = cli.main(
        ["probe", "--config", "configs/probe/synthetic.py", "--workdir", str(workdir)]
        + [f"--config.encoder.path={encoder}", f"--config.data.root={three_splits}"]
    )
    assert again == 2
    assert "already holds a finished probe run" in capsys.readouterr().err


def test_one_split_is_held_out_stratified_and_multilabel_picks_bce(tmp_path, encoder):
    root = write_prepared(tmp_path / "one", {"train": clips(40, multilabel=True)})
    results = run_probe(probe_config(encoder, root, probes="cgp,lp"), tmp_path / "run", say=lambda s: None)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["protocol"] == "holdout" and resolved["multilabel"] and resolved["loss"] == "bce"
    assert results["cgp"]["test"]["accuracy"] is None  # multi-label: no accuracy
    assert 0 < results["cgp"]["test"]["num_examples"] < 40
    assert "best_validation" not in results["cgp"]


def test_kfold_reports_each_fold_and_mean_std(tmp_path, encoder):
    folds = [1 + i % 3 for i in range(36)]
    root = write_prepared(tmp_path / "cv", {"train": clips(36)}, folds={"train": folds})
    cfg = probe_config(encoder, root, probes="cgp")
    cfg.data.kfold = True
    cfg.per_layer_lp = True
    results = run_probe(cfg, tmp_path / "run", say=lambda s: None)
    entry = results["cgp"]
    assert sorted(entry["folds"]) == ["1", "2", "3"]
    accs = [entry["folds"][k]["test"]["accuracy"] for k in ("1", "2", "3")]
    assert all(entry["folds"][k]["test"]["num_examples"] == 12 for k in ("1", "2", "3"))
    assert entry["test"]["accuracy"] == pytest.approx(np.mean(accs))
    assert entry["test"]["accuracy_std"] == pytest.approx(np.std(accs))
    gates = json.loads((tmp_path / "run" / "gates.json").read_text())
    assert sorted(gates["cgp"]) == ["1", "2", "3"]
    assert all((tmp_path / "run" / "params" / k).is_dir() for k in ("1", "2", "3"))
    per_layer = json.loads((tmp_path / "run" / "per_layer_lp.json").read_text())
    assert per_layer["metric"] == "accuracy" and sorted(per_layer["folds"]) == ["1", "2", "3"]
    assert per_layer["values"] == pytest.approx(np.mean([per_layer["folds"][k] for k in "123"], axis=0))
    assert len(per_layer["values"]) == 2  # one per encoder layer


def test_vqt_trains_beside_the_other_probes(tmp_path, encoder, three_splits):
    # VQT runs the encoder's blocks with its query tokens inside the same jitted step as the other probes.
    import jax
    import orbax.checkpoint as ocp

    cfg = probe_config(encoder, three_splits, probes="lp,vqt")
    cfg.probe.vqt_queries = 3
    results = run_probe(cfg, tmp_path / "run", say=lambda s: None)
    assert results["vqt"]["test"]["num_examples"] == 16
    with ocp.StandardCheckpointer() as checkpointer:
        saved = checkpointer.restore((tmp_path / "run" / "params" / "final").absolute())
    assert saved["vqt"]["query_tokens"].shape == (1, 2, 3, 32)  # [members, layers, queries, dim]
    assert jax.tree.leaves(saved["vqt"]["fc"])[0].shape[0] == 1


def _refused(cfg, workdir, match):
    with pytest.raises(ProbeConfigError, match=match):
        run_probe(cfg, workdir, say=lambda s: None)
    assert not (workdir / "metrics.jsonl").exists()  # refused before any training


def test_bad_input_is_refused_before_any_compute(tmp_path, encoder, three_splits):
    other = write_prepared(tmp_path / "other", {"test": clips(8)}, vocabulary=["a", "b", "c", "x"])
    cfg = probe_config(encoder, three_splits, data__eval_root=str(other))
    _refused(cfg, tmp_path / "w1", "label vocabulary of .* differs")

    empty = write_prepared(tmp_path / "empty", {"train": clips(16), "test": []})
    _refused(probe_config(encoder, empty), tmp_path / "w2", "the split 'test' of .* is empty")

    kaldi = write_prepared(tmp_path / "kaldi", {"train": clips(16), "test": clips(8)}, frontend="kaldi")
    _refused(
        probe_config(encoder, kaldi), tmp_path / "w3", "prepared with the Kaldi fbank .* expects BAT log-mel"
    )

    _refused(probe_config(encoder, three_splits, probes="cgp_frame"), tmp_path / "w4", "frame-wise targets")
    _refused(probe_config(encoder, three_splits, probes="cgp,mlp"), tmp_path / "w5", "probes: expected names")
    _refused(probe_config(encoder, three_splits, optim__warmup_steps=6), tmp_path / "w6", "warmup_steps")


def test_a_saved_probe_of_another_depth_is_refused(tmp_path, encoder, three_splits):
    workdir = tmp_path / "run"
    run_probe(probe_config(encoder, three_splits, probes="lp"), workdir, say=lambda s: None)
    deeper = tiny_encoder(tmp_path / "deeper", depth=3)
    with pytest.raises(ProbeConfigError, match="depth 2, dim 32, but this encoder has depth 3"):
        run_probe(
            probe_config(deeper, three_splits, probes="lp"), workdir, say=lambda s: None, overwrite=True
        )


@pytest.mark.slow
def test_probe_sharded_over_8_devices_matches_one_device(tmp_path, encoder, three_splits):
    # The tests run on 8 simulated CPU devices (tests/conftest.py): the batch is split over them. The same
    # run in a process with one device must give the same figures and gates.
    import jax

    assert jax.device_count() == 8
    eight = run_probe(probe_config(encoder, three_splits, probes="cgp,lp"), tmp_path / "eight", say=print)
    script = (
        "import sys, jax; from bat_jax.probe import run_probe; from tests.probe.helpers import probe_config\n"
        "assert jax.device_count() == 1, jax.devices()\n"
        "run_probe(probe_config(sys.argv[1], sys.argv[2], probes='cgp,lp'), sys.argv[3], say=print)\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", script, str(encoder), str(three_splits), str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 device(s)" in out.stdout
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for name in ("cgp", "lp"):
        assert eight[name]["test"]["accuracy"] == one[name]["test"]["accuracy"]
        assert eight[name]["test"]["map"] == pytest.approx(one[name]["test"]["map"], abs=1e-5)
    g1 = json.loads((tmp_path / "one" / "gates.json").read_text())["cgp"]
    g8 = json.loads((tmp_path / "eight" / "gates.json").read_text())["cgp"]
    assert np.allclose(g1, g8, rtol=1e-5, atol=1e-7)
