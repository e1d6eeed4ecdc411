"""The embedded synthetic dataset (`bat-jax prepare --source synthetic`): 10 single-label sound classes,
train and eval splits. Sized for a laptop CPU: 256-frame crops, float32, CGP and a linear probe.

    bat-jax probe --config configs/probe/synthetic.py --workdir runs/demo-probe \\
        --config.encoder.path=runs/demo --config.data.root=data/demo
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "synthetic"
    c.frames = 256
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
