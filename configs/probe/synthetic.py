"""The embedded synthetic dataset (`bat-jax prepare --source synthetic`): single-label sound classes, train
and eval splits. Sized for a laptop CPU: whole clips (1024 frames, the clips last 1-10 s), float32, CGP and
a linear probe trained from the feature cache (the encoder runs once over the training clips).

    bat-jax probe --config configs/probe/synthetic.py --workdir runs/demo-probe \\
        --config.encoder.path=runs/demo --config.data.root=data/demo
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "synthetic"
    c.frames = 1024
    c.cache.enabled = True
    c.probes = "cgp,lp"
    c.encoder.dtype = "float32"
    c.data.root = "data/demo"
    c.data.test_split = "eval"
    c.data.multilabel = "single"
    c.probe.num_prototypes = 256
    c.train.steps = 300
    c.train.batch_size = 16
    c.train.log_every = 25
    c.optim.warmup_steps = 30
    return c
