"""ESC-50, 50 classes, single-label, 5-fold cross-validation (mean ± std over folds): prepare the
2,000 clips as one split with `bat-jax prepare ... --fold-column fold`.

Recipe: PAPER.md §1.3 (frames 512, batch 48, 4,000 steps, warm-up 400, weight decay 0.2).
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "esc50"
    c.frames = 512
    c.loss = "cross_entropy"
    c.train.batch_size = 48
    c.train.steps = 4_000
    c.train.eval_every = 0
    c.optim.warmup_steps = 400
    c.optim.weight_decay = 0.2
    c.data.kfold = True
    c.data.multilabel = "single"
    return c
