"""The feature cache (issue 8 §2): the cached tokens are the encoder's, its size is said before it is built,
and a cache that fits nowhere is refused before any compute."""

import json

import jax
import numpy as np
import pytest

from bat_jax.convert import load_encoder
from bat_jax.data.pipeline import EvalLoader, shard_paths
from bat_jax.models import xla_options
from bat_jax.probe import cache as cache_lib
from bat_jax.probe import run_probe
from bat_jax.probe import step as step_lib
from bat_jax.probe.heads import ProbeConfigError
from tests.probe.helpers import clips, probe_config, tiny_encoder, write_prepared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    encoder = tiny_encoder(base / "enc")
    root = write_prepared(base / "data", {"train": clips(20, seed=3), "test": clips(8, seed=4)})
    return encoder, root


def test_cached_tokens_are_the_encoders_in_bfloat16(tmp_path, setup):
    encoder_path, root = setup
    enc = load_encoder(encoder_path)
    loader = EvalLoader(shard_paths(root, "train"), global_batch_size=8, target_frames=64, num_classes=4)
    tokens, grid = cache_lib.tokens_per_clip(64, enc.config)
    assert (tokens, grid) == (1 + 4 * 8, (4, 8))
    cache = cache_lib.FeatureCache(20, enc.config.depth, grid, enc.config.dim, 4, "disk", tmp_path)
    cache_lib.build(cache, loader, step_lib.encoder_forward(enc.config), enc.params, say=lambda s: None)
    # reference: the frozen encoder on every clip, in record order
    specs = np.concatenate([b["spec"][b["valid"]] for b in loader])
    out = enc(specs)
    want_cls = np.moveaxis(np.asarray(out.cls), 0, 1).astype(cache_lib.BF16)
    want_patches = np.moveaxis(np.asarray(out.patches), 0, 1).astype(cache_lib.BF16)
    np.testing.assert_array_equal(cache.arrays["cls"], want_cls)
    np.testing.assert_array_equal(cache.arrays["patches"], want_patches)
    assert (tmp_path / "patches.npy").stat().st_size >= 20 * cache_lib.bytes_per_clip(2, 32, 32)
    # a batch from the cache reaches the step as float32 [L, B, ...]
    batch = cache_lib.CachedBatches(cache, 8, 0, None).cache.batch(np.array([3, 1]))
    cls, patches = cache_lib.cached_forward(None, jax.tree.map(np.asarray, batch["spec"]))
    assert cls.shape == (2, 2, 32) and patches.shape == (2, 2, 4, 8, 32)
    np.testing.assert_array_equal(np.asarray(cls[:, 0]), want_cls[1].astype(np.float32))


def test_probe_with_the_cache_says_its_size_first_and_runs(tmp_path, setup):
    encoder, root = setup
    cfg = probe_config(encoder, root, probes="cgp,lp")
    cfg.cache.enabled = True
    lines = []
    results = run_probe(cfg, tmp_path / "run", say=lines.append)
    size = next(i for i, line in enumerate(lines) if line.startswith("feature cache: 20 clips × 2 layers"))
    built = next(i for i, line in enumerate(lines) if line.startswith("feature cache built: 20 clips"))
    assert size < built
    per_clip = cache_lib.bytes_per_clip(2, 33, 32)
    assert f"= {20 * per_clip / 1e6:.1f} MB in memory" in lines[size]
    assert results["cgp"]["test"]["num_examples"] == 8
    gates = json.loads((tmp_path / "run" / "gates.json").read_text())["cgp"]
    assert abs(sum(gates) - 1) < 1e-5


@pytest.mark.parametrize("cache", [False, True], ids=["recomputed", "cached"])
def test_a_bfloat16_encoder_compiles_its_forward_with_ynn_dots_and_the_cached_step_as_float32(
    tmp_path, setup, monkeypatch, cache
):
    """The job's compile options (`xla_options.inference`): a bfloat16 encoder's forward (the recomputing
    step, the evaluation step, the cache's pass) runs its dots in YNNPACK; the step on cached tokens runs no
    encoder and gets float32's options."""
    encoder, root = setup
    seen = {}
    for name in ("jit_train_step", "jit_eval_step"):
        original = getattr(step_lib, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            seen[_name] = kwargs.get("compiler_options")
            return _original(*args, **kwargs)

        monkeypatch.setattr(step_lib, name, spy)
    build = cache_lib.build

    def spy_build(cache, loader, forward, encoder_params, say, compiler_options=None):
        seen["cache"] = compiler_options
        return build(cache, loader, forward, encoder_params, say, compiler_options)

    monkeypatch.setattr(cache_lib, "build", spy_build)
    cfg = probe_config(encoder, root, probes="cgp,lp", encoder__dtype="bfloat16")
    cfg.cache.enabled = cache
    results = run_probe(cfg, tmp_path / "run", say=lambda line: None)
    bf16, f32 = xla_options.inference(encoder_dtype="bfloat16"), xla_options.inference()
    assert bf16 == xla_options.YNN_DOTS_ONLY and f32 == xla_options.NO_YNN_FUSIONS  # on this CPU
    assert seen["jit_eval_step"] == bf16
    assert seen["jit_train_step"] == (f32 if cache else bf16)
    assert seen.get("cache") == (bf16 if cache else None)
    assert np.isfinite(results["cgp"]["test"]["accuracy"])


def test_a_cache_that_fits_nowhere_is_refused_naming_the_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_lib, "available_memory", lambda: 10_000_000)  # 10 MB
    # 20 clips of 1 MB fit in half of 10 MB? no: on disk (the tmp disk has room)
    assert cache_lib.plan(20, 1_000_000, "auto", tmp_path / "c") == ("disk", 20_000_000)
    assert cache_lib.plan(4, 1_000_000, "auto", tmp_path / "c") == ("memory", 4_000_000)
    with pytest.raises(ProbeConfigError, match=r"needs 20.0 MB \(20 clips × 1.0 MB\).*cache.where=disk"):
        cache_lib.plan(20, 1_000_000, "memory", tmp_path / "c")
    huge = 10**15  # 1 PB per clip: no disk holds it
    with pytest.raises(
        ProbeConfigError, match=r"needs 2000000.00 GB \(2 clips × 1000000.00 GB\).* free on the disk"
    ):
        cache_lib.plan(2, huge, "auto", tmp_path / "c")


def test_vqt_with_the_cache_is_refused(tmp_path, setup):
    encoder, root = setup
    cfg = probe_config(encoder, root, probes="cgp,vqt")
    cfg.cache.enabled = True
    with pytest.raises(ProbeConfigError, match="vqt runs the encoder"):
        run_probe(cfg, tmp_path / "run", say=lambda s: None)
