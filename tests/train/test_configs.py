"""The shipped configs load and build the objects the code runs on."""

from pathlib import Path

import pytest

from bat_jax.models.bat_ssl import ssl_bat_base
from bat_jax.train import config as train_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRETRAIN = sorted((CONFIGS / "pretrain").glob("[!_]*.py"))


def test_pretrain_configs_exist():
    assert {p.stem for p in PRETRAIN} >= {"bat_base", "bat_small", "eat_style", "tiny"}


@pytest.mark.parametrize("path", PRETRAIN, ids=lambda p: p.stem)
def test_pretrain_config_builds(path):
    cfg = train_config.load(str(path))
    ssl = train_config.ssl_config(cfg)
    assert ssl.num_patches == cfg.data.target_frames // 16 * 8
    assert train_config.optimizer(cfg) is not None


def test_bat_base_is_the_paper_recipe():
    cfg = train_config.load(str(CONFIGS / "pretrain" / "bat_base.py"))
    ssl = train_config.ssl_config(cfg)
    # Same objective as the preset, except the bf16 compute dtype of the encoder.
    assert ssl.replace(encoder=ssl.encoder.replace(dtype="float32")) == ssl_bat_base()
    assert (ssl.encoder.dim, ssl.encoder.depth, ssl.encoder.num_heads, ssl.encoder.use_gate) == (
        768,
        12,
        12,
        True,
    )
    assert (ssl.num_views, ssl.mask_ratio, ssl.decoder_depth, ssl.decoder_heads) == (16, 0.8, 6, 12)
    assert (cfg.optim.peak_lr, cfg.optim.total_steps, cfg.data.global_batch_size) == (5e-4, 400_000, 48)


def test_eat_style_has_no_gate_and_ffn_targets():
    ssl = train_config.ssl_config(train_config.load(str(CONFIGS / "pretrain" / "eat_style.py")))
    assert not ssl.encoder.use_gate and ssl.target == "ffn"


@pytest.mark.parametrize("task", ["as20k", "esc50", "sc2", "hsn", "dcase"])
def test_probe_configs(task):
    cfg = train_config.load(f"{CONFIGS / 'probe' / 'cgp.py'}:{task}")
    assert cfg.task == task and cfg.probe.num_prototypes == 10_000
    assert 0 < cfg.optim.warmup_steps < cfg.optim.total_steps
    assert cfg.probe.name == ("cgp_frame" if task == "dcase" else "cgp")


def test_bad_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file"):
        train_config.load(str(tmp_path / "missing.py"))
    with pytest.raises(ValueError, match="expected a task"):
        train_config.load(f"{CONFIGS / 'probe' / 'cgp.py'}:nope")
    cfg = train_config.load(str(CONFIGS / "pretrain" / "tiny.py"))
    cfg.encoder.preset = "huge"
    with pytest.raises(ValueError, match="encoder.preset"):
        train_config.encoder_config(cfg)
