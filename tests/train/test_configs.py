"""The shipped configs load and build the objects the code runs on; bat_base holds the paper's recipe."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from bat_jax.data import pipeline, records
from bat_jax.models.ema import ema_decay
from bat_jax.models.masking import num_centres, num_kept
from bat_jax.models.ssl_objective import SSLConfig, check_batch
from bat_jax.train import config as train_config
from bat_jax.train.step import lr_schedule, make_optimizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRETRAIN = sorted((CONFIGS / "pretrain").glob("[!_]*.py"))


def test_pretrain_configs_exist():
    assert {p.stem for p in PRETRAIN} >= {"bat_base", "bat_small", "eat_style", "tiny"}


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
def test_pretrain_config_builds(path):
    cfg = train_config.load(str(path))
    ssl = train_config.ssl_config(cfg)
    assert isinstance(ssl, SSLConfig) and ssl.frames == cfg.frames
    assert ssl.num_patches == cfg.frames // ssl.encoder.patch_size[0] * ssl.encoder.freq_patches
    tx = train_config.optimizer(cfg)
    params = {"w": jnp.ones((3,))}
    updates, _ = tx.update({"w": jnp.ones((3,))}, tx.init(params), params)
    assert np.all(np.isfinite(np.asarray(updates["w"])))
    kwargs = train_config.loader_kwargs(cfg)
    assert kwargs["target_frames"] == ssl.frames  # one number for the loader and the objective
    assert kwargs["frames_multiple"] == ssl.encoder.patch_size[0]  # the config's encoder decides
    assert set(kwargs) == {"target_frames", "frames_multiple", "global_batch_size", "seed", "worker_count"}
    assert train_config.pretrain_config(path.stem) == cfg


def test_bat_base_is_the_paper_recipe():
    """PAPER.md §2.4, read from the config (the one place the code takes these numbers from)."""
    cfg = train_config.pretrain_config("bat_base")
    ssl = train_config.ssl_config(cfg)
    enc = ssl.encoder
    assert (enc.dim, enc.depth, enc.num_heads, enc.use_gate, enc.patch_size) == (768, 12, 12, True, (16, 16))
    assert (ssl.frames, ssl.grid, ssl.num_views) == (1024, (64, 8), 16)
    # inverse block masking: 5 centres of 5x5 blocks, exactly 102 of 512 patches kept per view
    assert (ssl.mask_ratio, ssl.mask_block, ssl.mask_adjust) == (0.8, 5, 0.07)
    assert num_kept(ssl.num_patches, ssl.mask_ratio) == 102
    assert num_centres(ssl.num_patches, ssl.mask_ratio, ssl.mask_block, ssl.mask_adjust) == 5
    dec = ssl.decoder
    assert (dec.width, dec.depth, dec.num_heads, dec.mlp_ratio, dec.grid) == (768, 6, 12, 4.0, (64, 8))
    assert (ssl.target, ssl.target_eps, ssl.instance_norm_targets, ssl.layer_norm_targets) == (
        "eob",
        1e-6,
        True,
        True,
    )
    assert (ssl.global_weight, ssl.local_weight) == (1.0, 1.0)
    assert (ssl.ema_start, ssl.ema_end, ssl.ema_warmup_steps) == (0.9998, 0.99999, 100_000)
    assert dict(cfg.optim) == {
        "peak_lr": 5e-4,
        "warmup_steps": 53_000,  # the reference's configs/ssl.yaml (the paper text: 50k)
        "end_lr": 1e-6,
        "b1": 0.9,
        "b2": 0.95,
        "weight_decay": 0.05,
    }
    assert cfg.data.global_batch_size == 48
    assert cfg.train.steps == 400_000


def test_bat_base_schedules_follow_the_config():
    """The schedules built from the config: the lr starts at the floor, peaks at the warm-up's end and is back
    at the floor at the end of the run; the EMA decay ramps from ema_start to ema_end."""
    cfg = train_config.pretrain_config("bat_base")
    ssl, optim = train_config.ssl_config(cfg), cfg.optim
    lr = lr_schedule(
        **{k: optim[k] for k in ("peak_lr", "warmup_steps", "end_lr")}, total_steps=cfg.train.steps
    )
    assert float(lr(0)) == pytest.approx(1e-6, rel=1e-5)
    assert float(lr(53_000)) == pytest.approx(5e-4, rel=1e-5)
    assert float(lr(400_000)) == pytest.approx(1e-6, rel=1e-5)
    assert float(ema_decay(0, ssl.ema_start, ssl.ema_end, ssl.ema_warmup_steps)) == np.float32(0.9998)
    assert float(ema_decay(99_999, ssl.ema_start, ssl.ema_end, ssl.ema_warmup_steps)) == np.float32(0.99999)


def test_smaller_configs_state_only_what_differs():
    base = train_config.ssl_config(train_config.pretrain_config("bat_base"))
    small = train_config.ssl_config(train_config.pretrain_config("bat_small"))
    assert (small.encoder.dim, small.encoder.num_heads, small.decoder.num_heads) == (384, 6, 6)
    assert small.replace(encoder=base.encoder, decoder_heads=base.decoder_heads) == base
    eat = train_config.ssl_config(train_config.pretrain_config("eat_style"))
    assert not eat.encoder.use_gate and eat.target == "ffn"
    assert eat.replace(encoder=base.encoder, target=base.target) == base


def test_loader_kwargs_give_batches_the_ssl_config_accepts(tmp_path):
    """The one `frames` key: a loader built from the config yields spec [B, frames, n_mels], as SSLConfig
    expects; a different cfg.frames changes both."""
    cfg = train_config.pretrain_config("tiny")
    cfg.frames = 48
    ssl = train_config.ssl_config(cfg)
    batch = _first_batch(tmp_path, cfg, ssl.encoder.n_mels)
    assert batch["spec"].shape == (cfg.data.global_batch_size, 48, ssl.encoder.n_mels)
    check_batch(jnp.asarray(batch["spec"]), ssl)


def test_loader_kwargs_take_the_frames_multiple_from_the_config_encoder(tmp_path):
    """An encoder with 8-frame time patches: 40 frames suit it (not the loader's default of 16)."""
    cfg = train_config.pretrain_config("tiny")
    cfg.encoder.overrides.patch_size = (8, 16)
    cfg.frames = 40
    ssl = train_config.ssl_config(cfg)
    assert train_config.loader_kwargs(cfg)["frames_multiple"] == 8
    batch = _first_batch(tmp_path, cfg, ssl.encoder.n_mels)
    assert batch["spec"].shape == (cfg.data.global_batch_size, 40, ssl.encoder.n_mels)
    check_batch(jnp.asarray(batch["spec"]), ssl)


def _first_batch(tmp_path, cfg, n_mels):
    """One batch of a loader built from `cfg` over one shard of random clips of 20-79 frames."""
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    writer = ArrayRecordWriter(str(tmp_path / "train" / "train-00000-of-00001.arrayrecord"), "group_size:1")
    for i in range(cfg.data.global_batch_size):
        n = int(rng.integers(20, 80))  # shorter and longer than the target
        spec = rng.uniform(0, 1, (n, n_mels)).astype(np.float16)
        writer.write(records.encode(records.Clip(spec, n, f"clip{i}")))
    writer.close()
    loader = pipeline.make_pretrain_loader(
        pipeline.shard_paths(tmp_path, "train"), **train_config.loader_kwargs(cfg)
    )
    try:
        return next(iter(loader))
    finally:
        loader.close()


def test_ssl_preset_applies_overrides():
    cfg = train_config.ssl_preset("tiny", frames=64, num_views=2)
    assert (cfg.frames, cfg.num_views, cfg.grid, cfg.encoder.dim) == (64, 2, (4, 8), 64)


# task: (frames, batch, steps, warm-up, weight decay, loss) of PAPER.md §1.3
PROBE_RECIPES = {
    "as20k": (1024, 48, 20_000, 500, 0.05, "asymmetric"),
    "as2m": (1024, 48, 20_000, 500, 0.05, "asymmetric"),
    "esc50": (512, 48, 4_000, 400, 0.2, "cross_entropy"),
    "sc2": (112, 256, 10_000, 1_000, 0.05, "cross_entropy"),
    "hsn": (512, 64, 10_000, 1_000, 0.05, "bce"),
    "dcase": (12_000, 4, 4_000, 400, 0.05, "bce"),
}


@pytest.mark.parametrize("task", sorted(PROBE_RECIPES))
def test_probe_configs(task):
    cfg = train_config.load(str(CONFIGS / "probe" / f"{task}.py"))
    assert cfg.task == task and cfg.probe.num_prototypes == 10_000
    frames, batch, steps, warmup, wd, loss = PROBE_RECIPES[task]
    assert (cfg.frames, cfg.train.batch_size, cfg.train.steps) == (frames, batch, steps)
    assert (cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.loss) == (warmup, wd, loss)
    assert cfg.probes == ("cgp_frame" if task == "dcase" else "cgp")
    assert cfg.data.kfold == (task == "esc50")


def test_bad_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        train_config.load(str(tmp_path / "missing.py"))
    with pytest.raises(FileNotFoundError, match=r"no huge\.py; .*source checkout.*config\.load\("):
        train_config.pretrain_config("huge")
    cfg = train_config.pretrain_config("tiny")
    cfg.encoder.preset = "huge"
    with pytest.raises(ValueError, match="encoder.preset"):
        train_config.encoder_config(cfg)


def test_missing_or_unknown_keys_are_named():
    cfg = train_config.pretrain_config("tiny")
    del cfg.ssl["mask_ratio"]
    with pytest.raises(ValueError, match=r"section 'ssl'.*missing \['mask_ratio'\], unknown \[\]"):
        train_config.ssl_config(cfg)
    cfg = train_config.pretrain_config("tiny")
    cfg.ssl.frames = 512  # frames live at the top level, not under ssl
    with pytest.raises(ValueError, match=r"unknown \['frames'\]"):
        train_config.ssl_config(cfg)
    cfg = train_config.pretrain_config("tiny")
    cfg.optim.lr = 1e-3
    del cfg.optim["b2"]
    with pytest.raises(ValueError, match=r"section 'optim'.*missing \['b2'\], unknown \['lr'\]"):
        train_config.optimizer(cfg)
    cfg = train_config.pretrain_config("tiny")
    del cfg["frames"]
    with pytest.raises(ValueError, match="top-level key 'frames'"):
        train_config.loader_kwargs(cfg)
    cfg = train_config.pretrain_config("tiny")
    del cfg.data["seed"]
    with pytest.raises(ValueError, match=r"section 'data'.*missing \['seed'\]"):
        train_config.loader_kwargs(cfg)


def test_no_recipe_defaults_in_the_code():
    """Every number comes from a config: the dataclass and the optimizer refuse to guess."""
    with pytest.raises(TypeError, match="required keyword-only"):
        SSLConfig(encoder=train_config.ssl_preset("tiny").encoder, frames=1024)
    with pytest.raises(TypeError, match="required keyword-only"):
        make_optimizer(peak_lr=1e-3, warmup_steps=0, total_steps=10)
