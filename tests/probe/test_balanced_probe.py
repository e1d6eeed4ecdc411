"""`bat-jax probe` with data.sampler=class_balanced (BirdSet HSN's recipe): the training loader, or the
feature cache's batches, draw class-balanced; evaluation never samples; an unknown sampler is refused in one
line."""

import pytest

from bat_jax.probe import cache as cache_lib
from bat_jax.probe import job, run_probe
from bat_jax.probe.heads import ProbeConfigError
from bat_jax.train.config import load
from tests.probe.helpers import clips, probe_config, tiny_encoder, write_prepared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("balanced")
    encoder = tiny_encoder(base / "enc")
    root = write_prepared(
        base / "data",
        {"train": clips(24, seed=5, multilabel=True), "test": clips(8, seed=6, multilabel=True)},
    )
    return encoder, root


def test_the_configs_default_to_shuffle_and_hsn_balances():
    assert load("configs/probe/base.py").data.sampler == "shuffle"
    assert load("configs/probe/hsn.py").data.sampler == "class_balanced"


@pytest.mark.parametrize("cache", [False, True])
def test_probe_trains_class_balanced_with_and_without_the_cache(tmp_path, setup, monkeypatch, cache):
    encoder, root = setup
    seen = []

    def spy(real):
        def build(*args, **kwargs):
            out = real(*args, **kwargs)
            seen.append((real.__name__, out.sampler))
            return out

        return build

    monkeypatch.setattr(job, "PretrainLoader", spy(job.PretrainLoader))
    monkeypatch.setattr(cache_lib, "CachedBatches", spy(cache_lib.CachedBatches))
    cfg = probe_config(encoder, root, probes="lp", data__sampler="class_balanced", train__steps=4)
    cfg.cache.enabled = cache
    results = run_probe(cfg, tmp_path / "run", say=lambda s: None)
    assert seen == [("CachedBatches" if cache else "PretrainLoader", "class_balanced")]
    assert results["lp"]["test"]["num_examples"] == 8  # evaluation: every test clip once
    assert results["lp"]["test"]["map"] is not None


@pytest.mark.parametrize("cache", [False, True])
def test_an_unknown_sampler_is_refused_naming_the_key(tmp_path, setup, cache):
    encoder, root = setup
    cfg = probe_config(encoder, root, probes="lp", data__sampler="balanced")
    cfg.cache.enabled = cache
    with pytest.raises(
        ProbeConfigError, match=r"^data\.sampler: expected one of shuffle, class_balanced, found 'balanced'$"
    ):
        run_probe(cfg, tmp_path / "run", say=lambda s: None)
