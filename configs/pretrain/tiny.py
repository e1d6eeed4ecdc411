"""A tiny BAT for the demo, the tests and a laptop CPU: 64 wide, 3 blocks, 2 decoder blocks, 4 views.

The SSL model is the size of the reference's SSL test fixture (tests/golden/ssl_case); the rest as bat_base.
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("bat_base.py")))
    c.encoder.preset = "tiny"
    c.encoder.overrides.dtype = "float32"
    c.ssl.num_views = 4
    c.ssl.decoder_depth = 2
    c.ssl.decoder_heads = 4
    c.optim.peak_lr = 1e-3
    c.optim.warmup_steps = 20
    c.data.root = "data/demo"
    c.data.global_batch_size = 8
    c.data.worker_count = 0
    c.train.steps = 200
    c.train.log_every = 10
    c.train.checkpoint_every = 100
    return c
