#!/usr/bin/env bash
# bat-jax pretrain on every worker of an existing TPU VM (gcloud compute tpus tpu-vm ssh --worker=all).
# Usage: launch/tpu_pod.sh --tpu NAME --zone ZONE [--project P] [--remote-dir DIR] [--mount-bucket B]
#        [--dry-run] --config FILE --workdir DIR [--no-progress] [--config.a.b=v ...]
# The same as `bat-jax launch tpu ...` (README "Scaling up"; --help lists the flags). It runs the Python of
# $BAT_JAX_PYTHON, else the repository's .venv, else python3 (bat-jax installed in it).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${BAT_JAX_PYTHON:-$here/../.venv/bin/python}
[[ -x $python ]] || python=python3
exec "$python" -m bat_jax.launch tpu "$@"
