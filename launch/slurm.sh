#!/usr/bin/env bash
# A SLURM batch job of bat-jax pretrain, one srun task per GPU: writes the script, submits it.
# Usage: launch/slurm.sh --nodes N --gpus-per-node G [--partition P] [--account A] [--time T]
#        [--dry-run] --config FILE --workdir DIR [--no-progress] [--config.a.b=v ...]
# The same as `bat-jax launch slurm ...` (README "Scaling up"; --help lists the flags). It runs the Python of
# $BAT_JAX_PYTHON, else the repository's .venv, else python3 (bat-jax installed in it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${BAT_JAX_PYTHON:-$here/../.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m bat_jax.launch slurm "$@"
