"""BAT ViT-S/16 (Appendix C of the paper): 384 wide, 12 blocks, 6 heads; the rest as bat_base."""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("bat_base.py")))
    c.encoder.preset = "bat_small"
    c.ssl.decoder_heads = 6  # the decoder runs at the encoder width
    return c
