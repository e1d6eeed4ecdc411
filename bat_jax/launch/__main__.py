"""`python -m bat_jax.launch tpu|slurm|local ...`: the same as `bat-jax launch ...`."""

import sys

from bat_jax.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
