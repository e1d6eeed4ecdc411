"""One process of tests/train/test_multihost.py: `bat-jax pretrain ARGS...` (the real command line), and each
logged loss as this process read it, one JSON line per log in $BAT_JAX_TEST_LOSSES/process_<i>.jsonl.

    python tests/train/multihost_worker.py pretrain --config ... --num-processes 2 --process-id 1 ...
"""

import json
import os
import sys
from pathlib import Path

from bat_jax import cli
from bat_jax.train import pretrain


def _spy(log_scalars, out: Path):
    def log(*args):
        scalars = log_scalars(*args)
        import jax

        row = {"process": jax.process_index(), "loss": scalars["loss"]}  # one per log line, in order
        with open(out / f"process_{jax.process_index()}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        return scalars

    return log


if __name__ == "__main__":
    out = Path(os.environ["BAT_JAX_TEST_LOSSES"])
    out.mkdir(parents=True, exist_ok=True)
    pretrain._log_scalars = _spy(pretrain._log_scalars, out)
    sys.exit(cli.main(sys.argv[1:]))
