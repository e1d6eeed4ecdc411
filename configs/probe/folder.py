"""Your own prepared folder: `bat-jax prepare --source folder ...`, then

    bat-jax probe --config configs/probe/folder.py --workdir runs/mine \\
        --config.encoder.path=ENCODER --config.data.root=PREPARED

Single- or multi-label is read from the clips' labels (the loss follows: cross-entropy or BCE); a folder
prepared as one split is split by a seeded stratified hold-out of 20 % (the test set); with a test split
(and a validation split) those are used. CGP and a linear probe, 10-second crops, a short schedule.
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("base.py")))
    c.task = "folder"
    c.probes = "cgp,lp"
    c.train.steps = 2_000
    c.optim.warmup_steps = 200
    c.train.batch_size = 32
    c.probe.num_prototypes = 1_000  # small datasets: K scaled down from the paper's 10,000
    return c
