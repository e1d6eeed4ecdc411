"""configs/pretrain/tiny.py cut to 1 encoder block, 1 decoder block and 2 views: the same pretraining job
with a faster compile, for tests that only need the job to run (multi-host, compile-check, bench smoke)."""

from pathlib import Path

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "tiny.py")

SMALL = f"""\
from bat_jax.train.config import load


def get_config():
    c = load({TINY!r})
    c.encoder.overrides.depth = 1
    c.ssl.decoder_depth = 1
    c.ssl.num_views = 2
    return c
"""


def write_small_config(folder: Path) -> str:
    """The small config as FOLDER/small.py; its path."""
    path = Path(folder) / "small.py"
    path.write_text(SMALL)
    return str(path)
