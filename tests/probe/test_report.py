"""bat_jax.probe.report: reading probe workdirs (hand-written JSON) and drawing their layer gates."""

import json
import math

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from bat_jax.probe import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def softmax(logits) -> list[float]:
    e = np.exp(np.asarray(logits, np.float64) - np.max(logits))
    return (e / e.sum()).tolist()


def write_workdir(
    path,
    gates,
    metrics=None,
    per_layer=None,
    config=None,
):
    """A fake probe workdir holding the documented files (metrics.json, gates.json, optional others)."""
    path.mkdir(parents=True, exist_ok=True)
    if metrics is None:
        metrics = {
            key: {
                "test": {"accuracy": 0.5, "map": 0.4, "f1": 0.3, "per_class_ap": [0.4, None]},
                "best_validation": {"accuracy": 0.6, "map": 0.5, "f1": 0.4, "step": 30},
            }
            for key in gates
        }
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "gates.json").write_text(json.dumps(gates))
    if per_layer is not None:
        (path / "per_layer_lp.json").write_text(json.dumps(per_layer))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def late_gates(depth: int) -> list[float]:
    return softmax(np.linspace(-2.0, 2.0, depth))


def mid_gates(depth: int) -> list[float]:
    return softmax(-((np.arange(depth) - depth / 2) ** 2) / depth)


CONFIG = {
    "encoder": {"path": "/ckpt/bat_base"},
    "data": {"root": "/data/esc50"},
    "probes": ["cgp", "lcgp"],
    "task": "esc50",
}


@pytest.fixture
def workdir(tmp_path):
    folds = {"1": late_gates(12), "2": mid_gates(12), "3": softmax(np.zeros(12))}
    gates = {"cgp": late_gates(12), "lcgp": folds, "cgp@lr=0.0003,seed=1": mid_gates(12)}
    per_layer = {"metric": "map", "values": [0.1 + 0.02 * i for i in range(11)] + [None]}
    return write_workdir(tmp_path / "bat_esc50", gates, per_layer=per_layer, config=CONFIG)


# ----------------------------------------------------------------------------------------------- reading


def test_read_run(workdir):
    run = report.read_run(workdir)
    assert run.workdir == workdir and run.label == "bat_esc50"
    assert set(run.gates) == {"cgp", "lcgp", "cgp@lr=0.0003,seed=1"}
    assert run.gates["cgp"] == pytest.approx(late_gates(12))
    assert set(run.gates["lcgp"]) == {"1", "2", "3"}
    assert run.metrics["cgp"]["test"]["map"] == 0.4
    assert run.per_layer["metric"] == "map"
    assert run.per_layer["values"][0] == pytest.approx(0.1) and math.isnan(run.per_layer["values"][-1])
    assert run.config == CONFIG
    assert (run.depth, run.encoder, run.task) == (12, "bat_base", "esc50")
    with pytest.raises(AttributeError):
        run.label = "x"  # frozen


def test_read_run_optional_files(tmp_path):
    run = report.read_run(write_workdir(tmp_path / "w", {"cgp": late_gates(4)}), label="mine")
    assert run.per_layer is None and run.config is None
    assert (run.label, run.depth, run.encoder, run.task) == ("mine", 4, None, None)


def test_read_run_missing_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected a probe workdir.*found nothing") as err:
        report.read_run(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)


@pytest.mark.parametrize("name", ["metrics.json", "gates.json"])
def test_read_run_missing_file(tmp_path, name):
    workdir = write_workdir(tmp_path / "w", {"cgp": late_gates(4)})
    (workdir / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"expected a JSON file .* found no such file") as err:
        report.read_run(workdir)
    assert str(workdir / name) in str(err.value)


@pytest.mark.parametrize("name", ["metrics.json", "gates.json", "config.json", "per_layer_lp.json"])
def test_read_run_undecodable_file(tmp_path, name):
    workdir = write_workdir(tmp_path / "w", {"cgp": late_gates(4)})
    (workdir / name).write_text('{"cgp": [0.25, ')
    with pytest.raises(ValueError, match=r"expected valid UTF-8 JSON, found undecodable content") as err:
        report.read_run(workdir)
    assert str(workdir / name) in str(err.value)


def test_read_run_metrics_not_an_object(tmp_path):
    workdir = write_workdir(tmp_path / "w", {"cgp": late_gates(4)}, metrics=[1, 2])
    with pytest.raises(ValueError, match=r"metrics\.json: expected a JSON object .* found list"):
        report.read_run(workdir)


@pytest.mark.parametrize(
    "gates, message",
    [
        ([0.5, 0.5], r"expected an object of probe -> gate weights, found list"),
        ({"cgp": "0.5,0.5"}, r"\['cgp'\]: expected a non-empty list of gate weights, found '0.5,0.5'"),
        ({"cgp": []}, r"\['cgp'\]: expected a non-empty list of gate weights, found \[\]"),
        ({"cgp": [0.5, "0.5"]}, r"\['cgp'\]: expected finite numbers as gate weights, found '0.5' at index"),
        ({"cgp": [0.5, None]}, r"expected finite numbers as gate weights, found None at index 1"),
        ({"cgp": [True, 0.0]}, r"expected finite numbers as gate weights, found True at index 0"),
        ({"cgp": [0.5, [0.5]]}, r"expected finite numbers as gate weights, found \[0.5\] at index 1"),
        ({"cgp": [1.5, -0.5]}, r"expected gate weights >= 0 \(a softmax\), found min -0.5"),
        ({"cgp": [0.5, 0.6]}, r"\['cgp'\]: expected gate weights summing to 1 within 0.0001.*found sum 1.1"),
        ({"lcgp": {"1": [0.5, 0.5], "2": [0.3, 0.3]}}, r"\['lcgp'\]\['2'\]: expected gate weights summing"),
        ({"lcgp": {}}, r"\['lcgp'\]: expected fold -> gate weights, found an empty object"),
        ({"lcgp": {"1": [0.5, 0.5], "2": [1.0]}}, r"expected the same number of layers in every fold"),
        ({"cgp": [0.5, 0.5], "lcgp": [1.0]}, r"expected every gated probe to weigh the same encoder blocks"),
    ],
)
def test_read_run_bad_gates(tmp_path, gates, message):
    workdir = write_workdir(tmp_path / "w", gates, metrics={})
    with pytest.raises(ValueError, match=message) as err:
        report.read_run(workdir)
    assert str(workdir / "gates.json") in str(err.value)


def test_gate_sum_tolerance(tmp_path):
    ok = write_workdir(tmp_path / "ok", {"cgp": [0.25, 0.25, 0.25, 0.25 + 5e-5]})
    assert report.read_run(ok).gates["cgp"][-1] == pytest.approx(0.25005)
    bad = write_workdir(tmp_path / "bad", {"cgp": [0.25, 0.25, 0.25, 0.25 + 2e-4]})
    with pytest.raises(ValueError, match="summing to 1 within 0.0001"):
        report.read_run(bad)


@pytest.mark.parametrize(
    "per_layer, message",
    [
        ([0.1, 0.2], r"expected an object with 'metric' and 'values', found list"),
        ({"values": [0.1] * 4}, r"expected 'metric' to be a name such as 'map' or 'accuracy', found None"),
        ({"metric": "map", "values": []}, r"expected 'values' to be a non-empty list"),
        ({"metric": "map", "values": [0.1, "x", 0.1]}, r"expected numbers or null in 'values', found 'x'"),
        ({"metric": "map", "values": [0.1] * 5}, r"expected 4 values \(one per layer, as in gates.json\)"),
    ],
)
def test_read_run_bad_per_layer(tmp_path, per_layer, message):
    workdir = write_workdir(tmp_path / "w", {"cgp": late_gates(4)}, per_layer=per_layer)
    with pytest.raises(ValueError, match=message) as err:
        report.read_run(workdir)
    assert str(workdir / "per_layer_lp.json") in str(err.value)


# ------------------------------------------------------------------------------------------------ tables


def test_mean_gates_folds():
    mean, std = report.mean_gates({"1": [0.2, 0.8], "2": [0.4, 0.6], "3": [0.6, 0.4]})
    np.testing.assert_allclose(mean, [0.4, 0.6])
    np.testing.assert_allclose(std, [np.sqrt(0.08 / 3)] * 2)  # population std (ddof 0)
    _, sample_std = report.mean_gates({"1": [0.2, 0.8], "2": [0.4, 0.6], "3": [0.6, 0.4]}, ddof=1)
    np.testing.assert_allclose(sample_std, [0.2, 0.2])


def test_mean_gates_single_vector():
    mean, std = report.mean_gates([0.1, 0.3, 0.6])
    np.testing.assert_allclose(mean, [0.1, 0.3, 0.6])
    np.testing.assert_array_equal(std, [0.0, 0.0, 0.0])


def test_split_probe_key():
    assert report.split_probe_key("cgp@lr=0.0003,seed=1") == ("cgp", "lr=0.0003,seed=1")
    assert report.split_probe_key("cgp_patch_avg") == ("cgp_patch_avg", None)


def test_gate_table(workdir, tmp_path):
    other = write_workdir(tmp_path / "eat_esc50", {"cgp": mid_gates(6)}, config={"task": "esc50"})
    runs = [report.read_run(workdir), report.read_run(other)]
    rows = report.gate_table(runs)
    assert len(rows) == 12 + 3 * 12 + 12 + 6  # cgp, 3 folds of lcgp, the sweep member; the other run's cgp
    first = rows[0]
    assert first == report.GateRow("bat_esc50", "bat_base", "esc50", "cgp", None, None, 1, 12, first.weight)
    assert first.weight == pytest.approx(late_gates(12)[0])
    member = [r for r in rows if r.member is not None]
    assert {(r.probe, r.member) for r in member} == {("cgp", "lr=0.0003,seed=1")} and len(member) == 12
    lcgp = [r for r in rows if r.probe == "lcgp"]
    assert {r.fold for r in lcgp} == {"1", "2", "3"}
    for fold in "123":
        assert math.fsum(r.weight for r in lcgp if r.fold == fold) == pytest.approx(1.0)
    eat = [r for r in rows if r.run == "eat_esc50"]
    assert [r.layer for r in eat] == [1, 2, 3, 4, 5, 6] and {r.depth for r in eat} == {6}
    assert {r.encoder for r in eat} == {None}


def test_run_labels_disambiguated(tmp_path):
    a = report.read_run(write_workdir(tmp_path / "bat" / "esc50", {"cgp": late_gates(4)}))
    b = report.read_run(write_workdir(tmp_path / "eat" / "esc50", {"cgp": mid_gates(4)}))
    c = report.read_run(write_workdir(tmp_path / "as20k", {"cgp": mid_gates(4)}))
    assert report.run_labels([a, b, c]) == ["bat/esc50", "eat/esc50", "as20k"]
    assert report.run_labels([a, a]) == ["esc50 #1", "esc50 #2"]


def test_gate_summary(workdir):
    run = report.read_run(workdir)
    summary = {(s.probe, s.member): s for s in report.gate_summary([run])}
    cgp = summary["cgp", None]
    weights = np.asarray(late_gates(12))
    assert (cgp.folds, cgp.depth, cgp.peak_layer) == (0, 12, 12)
    assert cgp.peak_weight == pytest.approx(weights[-1])
    assert cgp.centre_layer == pytest.approx(float((np.arange(1, 13) * weights).sum()))
    assert cgp.centre_fraction == pytest.approx(cgp.centre_layer / 12)
    assert cgp.lp_correlation > 0.9  # both rise with depth (the null value is left out)
    assert summary["lcgp", None].folds == 3
    table = report.markdown_table(report.gate_summary([run]))
    assert table.splitlines()[0].startswith("| run | encoder | task | probe |")
    assert len(table.splitlines()) == 2 + 3


# ----------------------------------------------------------------------------------------------- figures


def bar_heights(ax) -> list[float]:
    return [p.get_height() for p in ax.patches]


def test_plot_gates_one_panel_per_probe(workdir):
    run = report.read_run(workdir)
    fig = report.plot_gates(run.gates)
    assert len(fig.axes) == 3
    for ax, (key, value) in zip(fig.axes, run.gates.items(), strict=True):
        assert ax.get_title() == key
        assert len(ax.patches) == 12
        assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "gate weight"
        np.testing.assert_allclose(bar_heights(ax), report.mean_gates(value)[0])
    bars = [next(c for c in ax.containers if isinstance(c, BarContainer)) for ax in fig.axes]
    assert bars[1].errorbar is not None  # fold std error bars on the lcgp panel
    np.testing.assert_allclose(bars[1].errorbar.lines[2][0].get_segments()[0][:, 0], [1, 1])
    assert bars[0].errorbar is None and bars[2].errorbar is None  # none without folds


def test_plot_gates_per_layer_twin_axis(workdir, tmp_path):
    run = report.read_run(workdir)
    fig = report.plot_gates({"cgp": run.gates["cgp"]}, run.per_layer, title="bat")
    assert len(fig.axes) == 2  # the panel and its twin
    panel, twin = fig.axes
    assert len(panel.patches) == 12 and twin.get_ylabel() == "per-layer linear probe map"
    np.testing.assert_allclose(twin.lines[0].get_ydata()[:11], run.per_layer["values"][:11])
    assert fig._suptitle.get_text() == "bat"
    short = {"metric": "map", "values": [0.1, 0.2, 0.3]}
    with pytest.raises(ValueError, match=r"expected per_layer values for the 12 gated layers, found 3"):
        report.plot_gates(run.gates, short)


def test_plot_gates_errors():
    with pytest.raises(ValueError, match="expected at least one gated probe in gates, found none"):
        report.plot_gates({})
    with pytest.raises(ValueError, match=r"plot_gates: gates \['cgp'\]: expected gate weights summing to 1"):
        report.plot_gates({"cgp": [0.2, 0.2]})


def test_save_gates_png(workdir):
    out = report.save_gates_png(workdir)
    assert out == workdir / "gates.png"
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 0 and height > 0


def test_save_gates_png_without_per_layer_or_probes(tmp_path):
    plain = write_workdir(tmp_path / "plain", {"lcgp": {"0": late_gates(6), "1": mid_gates(6)}})
    assert report.save_gates_png(plain).read_bytes()[:8] == PNG_SIGNATURE
    empty = write_workdir(tmp_path / "empty", {})
    assert report.save_gates_png(empty) is None and not (empty / "gates.png").exists()
    with pytest.raises(FileNotFoundError, match="expected a probe workdir, found no folder at"):
        report.save_gates_png(tmp_path / "nope")


def test_plot_compare_same_depth(workdir, tmp_path):
    other = write_workdir(tmp_path / "eat_esc50", {"cgp": mid_gates(12)})
    runs = [report.read_run(workdir), report.read_run(other)]
    fig = report.plot_compare(runs, probe="cgp", path=tmp_path / "compare.png")
    (ax,) = fig.axes
    assert len(ax.patches) == 2 * 12 and ax.get_xlabel() == "layer"
    labels = ax.get_legend_handles_labels()[1]
    assert "bat_esc50" in labels and "eat_esc50" in labels
    assert (tmp_path / "compare.png").read_bytes()[:8] == PNG_SIGNATURE


def test_plot_compare_different_depths(workdir, tmp_path):
    small = write_workdir(tmp_path / "small", {"cgp": {"1": late_gates(6), "2": mid_gates(6)}})
    runs = [report.read_run(workdir), report.read_run(small)]
    fig = report.plot_compare(runs, probe="cgp")
    (ax,) = fig.axes
    assert "depth fraction" in ax.get_xlabel() and "L = 6, 12" in ax.get_xlabel()
    assert "× L" in ax.get_ylabel()
    curves = [c.lines[0] for c in ax.containers if isinstance(c, ErrorbarContainer)]  # data lines, not caps
    by_len = {len(line.get_xdata()): line for line in curves}
    assert sorted(by_len) == [6, 12]
    np.testing.assert_allclose(by_len[12].get_xdata(), np.arange(1, 13) / 12)
    np.testing.assert_allclose(by_len[12].get_ydata(), np.asarray(late_gates(12)) * 12)
    np.testing.assert_allclose(by_len[6].get_xdata(), np.arange(1, 7) / 6)
    mean6 = (np.asarray(late_gates(6)) + np.asarray(mid_gates(6))) / 2
    np.testing.assert_allclose(by_len[6].get_ydata(), mean6 * 6)
    assert "small (L=6)" in ax.get_legend_handles_labels()[1]


def test_plot_compare_missing_probe(workdir, tmp_path):
    other = write_workdir(tmp_path / "lp_only", {"lcgp": late_gates(12)})
    runs = [report.read_run(workdir), report.read_run(other)]
    message = r"expected the probe 'cgp' in every run's gates.json, missing in"
    with pytest.raises(ValueError, match=message) as err:
        report.plot_compare(runs, probe="cgp")
    assert "lp_only" in str(err.value) and "['lcgp']" in str(err.value)
    with pytest.raises(ValueError, match="expected at least one ProbeRun, found none"):
        report.plot_compare([])
