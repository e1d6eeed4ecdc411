"""AudioSet-20k (balanced), 527 classes, multi-label: asymmetric loss (γ− = 1, γ+ = 0, clip 0).

Recipe: PAPER.md §1.3 (frames 1024, batch 48, 20,000 steps, warm-up 500, weight decay 0.05).
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "as20k"
    c.frames = 1024
    c.loss = "asymmetric"
    c.train.batch_size = 48
    c.train.steps = 20_000
    c.train.eval_every = 0
    c.optim.warmup_steps = 500
    c.optim.weight_decay = 0.05
    c.data.multilabel = "multi"
    c.probe.lasso_weight = 0.0  # H2T: no group lasso on AudioSet
    return c
