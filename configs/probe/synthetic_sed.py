"""Sound event detection on the embedded synthetic dataset: its events (onset and offset of every sound) as
frame-wise targets, the frame-wise CGP beside a clip-level CGP, scored by frame-wise mAP. Prepare the data
with the events first:

    bat-jax prepare --source synthetic --synthetic-events --out data/demo-sed --num-clips 600 \\
        --num-eval-clips 200
    bat-jax probe --config configs/probe/synthetic_sed.py --workdir runs/demo-sed \\
        --config.encoder.path=runs/demo --config.data.root=data/demo-sed
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("synthetic.py")))
    c.task = "synthetic_sed"
    c.probes = "cgp_frame,cgp"
    c.loss = "auto"  # BCE for the frame-wise probe; cross-entropy for the clip-level one on single labels
    c.data.root = "data/demo-sed"
    return c
