#!/usr/bin/env bash
# bat-jax pretrain as one process on all of this machine's devices.
# Usage: launch/local.sh [--dry-run] --config FILE --workdir DIR [--no-progress] [--config.a.b=v ...]
# The same as `bat-jax launch local ...` (README "Scaling up"; --help lists the flags). It runs the Python of
# $BAT_JAX_PYTHON, else the repository's .venv, else python3 (bat-jax installed in it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${BAT_JAX_PYTHON:-$here/../.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m bat_jax.launch local "$@"
