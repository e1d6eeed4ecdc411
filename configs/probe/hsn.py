"""BirdSet HSN, multi-label, BCE. Prepare with BirdSet's front-end settings (32 kHz, n_fft 2048, hop 320);
training clips are drawn class-balanced (data.sampler, as the reference's `WeightedRandomSampler`; weights
in `bat_jax.data.sampling`). The reference also adds Gaussian noise σ = 0.02 to the training waveforms (not
done here: the shards hold spectrograms).

Recipe: PAPER.md §1.3 (frames 512, batch 64, 10,000 steps, warm-up 1000, weight decay 0.05).
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "hsn"
    c.frames = 512
    c.loss = "bce"
    c.train.batch_size = 64
    c.train.steps = 10_000
    c.train.eval_every = 0
    c.optim.warmup_steps = 1_000
    c.optim.weight_decay = 0.05
    c.data.multilabel = "multi"
    c.data.test_split = "test_5s"
    c.data.sampler = "class_balanced"
    return c
