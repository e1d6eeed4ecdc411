"""EAT-style ablation of BAT (PAPER.md §3.3 first rows): no attention gate, FFN (pre-residual MLP) targets.

The reference ablation also swaps the ViT decoder for a CNN one; that decoder is not implemented here.
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("bat_base.py")))
    c.encoder.preset = "eat_base"
    c.encoder.overrides.pos_grid = (8, 64)  # BAT's own sin-cos layout for models pretrained here
    c.ssl.target = "ffn"
    return c
