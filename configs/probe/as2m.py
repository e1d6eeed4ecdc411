"""AudioSet-2M (unbalanced), 527 classes, multi-label. The reference's as2m configs are empty: the AS-20k
probe recipe (as20k.py) with AS-2M data, as the paper's Table 5 row.
"""

from pathlib import Path

from bat_jax.train.config import load


def get_config():
    c = load(str(Path(__file__).with_name("as20k.py")))
    c.task = "as2m"
    return c
