"""Speech Commands v2 in the paper's 12-class setup (10 keywords + unknown + silence), single-label.

Recipe: PAPER.md §1.3 (frames 112, batch 256, 10,000 steps, warm-up 1000, weight decay 0.05).
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "sc2"
    c.frames = 112
    c.loss = "cross_entropy"
    c.train.batch_size = 256
    c.train.steps = 10_000
    c.train.eval_every = 500
    c.optim.warmup_steps = 1_000
    c.optim.weight_decay = 0.05
    c.data.multilabel = "single"
    return c
