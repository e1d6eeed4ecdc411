"""DCASE 2016 task 2 (HEAR), sound event detection with the frame-wise CGP (160 ms tokens), BCE, scored by
frame-wise mAP. The folder needs its events: `bat-jax prepare --events-csv events.csv` (columns
path,onset,offset,label in seconds), with train / validation / test splits.

Recipe: PAPER.md §1.3 (frames 12000, batch 4, 4,000 steps, warm-up 400, weight decay 0.05).
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "dcase"
    c.frames = 12000
    c.loss = "bce"
    c.train.batch_size = 4
    c.train.steps = 4_000
    c.train.eval_every = 50
    c.optim.warmup_steps = 400
    c.optim.weight_decay = 0.05
    c.probes = "cgp_frame"
    c.probe.dropout_rate = 0.0
    c.data.multilabel = "multi"
    return c
