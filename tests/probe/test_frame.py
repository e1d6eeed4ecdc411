"""Frame-wise probing (sound event detection, issue 8 §1): `cgp_frame` trains on targets per time patch of the
encoder, made from the prepared folder's event annotations, with the padded time patches left out of the
loss and of the frame-wise mAP; planted events are learned; folders without events are refused."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bat_jax.models.probes import make_probe
from bat_jax.probe import heads as heads_lib
from bat_jax.probe import run_probe
from bat_jax.probe import step as step_lib
from bat_jax.probe.heads import ProbeConfigError
from tests.probe.helpers import event_clips, probe_config, tiny_encoder, write_prepared

PATCHES = 8  # time patches per clip: 128 frames


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_encoder(tmp_path_factory.mktemp("enc") / "tiny")


@pytest.fixture(scope="module")
def events_root(tmp_path_factory):
    train, train_events = event_clips(48, patches=PATCHES, seed=0)
    test, test_events = event_clips(16, patches=PATCHES, seed=1, pad_patches=2)  # 6 patches of audio each
    root = tmp_path_factory.mktemp("data") / "sed"
    return write_prepared(
        root, {"train": train, "test": test}, events={"train": train_events, "test": test_events}
    )


def _config(encoder, root, **overrides):
    base = dict(probes="cgp_frame,lp", frames=16 * PATCHES, loss="auto", data__multilabel="multi")
    base.update(train__steps=80, train__batch_size=8, optim__warmup_steps=8, optim__peak_lr=3e-3)
    return probe_config(encoder, root, **{**base, **overrides})


@pytest.mark.parametrize("cache", [False, True], ids=["recomputed", "cached"])
def test_cgp_frame_learns_planted_events_per_time_patch(tmp_path, encoder, events_root, cache):
    workdir = tmp_path / "run"
    metrics = run_probe(_config(encoder, events_root, cache__enabled=cache), workdir, say=lambda s: None)
    frame = metrics["cgp_frame"]["test"]
    assert frame["num_frames"] == 16 * (PATCHES - 2)  # the padded time patches are not scored
    assert frame["frame_map"] >= 0.9, frame  # each band is bright exactly during its events
    assert "accuracy" not in frame and len(frame["per_class_ap"]) == 4
    assert metrics["lp"]["test"]["map"] is not None  # a clip-level probe beside it, on the clip labels
    resolved = json.loads((workdir / "config.json").read_text())["resolved"]
    assert resolved["frame_wise"] and resolved["frame_loss"] == "bce" and resolved["hop_seconds"] == 0.01
    gates = json.loads((workdir / "gates.json").read_text())
    assert len(gates["cgp_frame"]) == 2 and abs(sum(gates["cgp_frame"]) - 1) < 1e-5


def test_padded_time_patches_do_not_count_in_the_loss():
    """The objective on a batch whose padded time patches hold garbage targets equals the one with zeros
    there, and differs when the padding is declared audio."""
    heads = {"cgp_frame": make_probe("cgp_frame", 3, 2, 8, num_prototypes=4, dropout_rate=0.0)}
    params = step_lib.init_params_of(heads, jax.random.key(0))
    cls = jax.random.normal(jax.random.key(1), (2, 2, 8))  # [L, B, D]
    patches = jax.random.normal(jax.random.key(2), (2, 2, 4, 2, 8))  # [L, B, T', F', D]
    labels = (jax.random.uniform(jax.random.key(3), (2, 4, 3)) > 0.5).astype(jnp.float32)
    num_frames = jnp.array([64, 32])  # clip 1: its last 2 time patches are padding
    garbage = labels.at[1, 2:].set(1.0 - labels[1, 2:])
    bce = heads_lib.loss_fn("bce")
    objective = step_lib._head_loss(heads, bce, 0.0, bce)

    def loss(frame_labels, frames):
        batch = {"labels": jnp.zeros((2, 3)), "frame_labels": frame_labels, "num_frames": frames}
        targets = step_lib.batch_targets(batch, heads, patch_frames=16)
        return objective(params, cls, patches, None, None, targets, jax.random.key(4))[0]

    np.testing.assert_allclose(loss(labels, num_frames), loss(garbage, num_frames), rtol=1e-6)
    full = jnp.array([64, 64])
    assert abs(float(loss(labels, full)) - float(loss(garbage, full))) > 1e-4


def test_frame_wise_probes_need_events_and_a_multi_label_loss(tmp_path, encoder, events_root):
    from tests.probe.helpers import clips

    plain = write_prepared(tmp_path / "plain", {"train": clips(16), "test": clips(8)})
    with pytest.raises(ProbeConfigError, match="split 'train' of .* has no event annotations.*--events-csv"):
        run_probe(_config(encoder, plain), tmp_path / "w1", say=lambda s: None)
    with pytest.raises(ProbeConfigError, match="frame-wise probes .* need 'bce' or 'asymmetric'"):
        run_probe(_config(encoder, events_root, loss="cross_entropy"), tmp_path / "w2", say=lambda s: None)
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
