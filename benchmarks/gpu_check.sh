#!/usr/bin/env bash
# The GPU check of issue 9 §4, in one run of at most ~5 minutes of device time (`run` on a lent GPU):
#   1. BAT-B's pretraining step at the paper's 48 clips x 16 views, bfloat16 (benchmarks/step.py: step time,
#      clips/s, MFU against a measured bf16 matmul peak, compiled memory); 12 clips x 16 views first, so a
#      figure exists even when 48 does not fit one device;
#   2. the BAT-B encoder forward (benchmarks/encoder.py, bf16, batch 48);
#   3. the CGP probe step on BAT-B (benchmarks/probe.py: K = 1,000 and the paper's 10,000 prototypes).
# Each part has its own timeout, writes its JSON / text under $OUT (default ./gpu_check), and the script goes on
# when one fails. Usage, from the repository root:   bash benchmarks/gpu_check.sh
set -u
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
PY="${PY:-python}"
# JAX takes 75 % of the card by default; 48 clips x 16 views need 108 GiB on an H200 (141 GiB), 87 GiB on an
# H100 (compile-check, benchmarks/RESULTS.md): give the job 95 %.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1 || true
"$PY" -c 'import jax; print(jax.devices(), jax.__version__)' > "$OUT/jax.txt" 2>&1
part() {  # name, timeout seconds, command...
  local name=$1 limit=$2; shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1; echo "rc $?" >> "$OUT/$name.txt"
  tail -n 3 "$OUT/$name.txt"
}
part step_12x16 90 "$PY" -m benchmarks.step --size base --batch 12 --views 16 --dtype bfloat16 --iters 5 --matmul 8192
part step_48x16 120 "$PY" -m benchmarks.step --size base --batch 48 --views 16 --dtype bfloat16 --iters 5 --matmul 8192
part encoder 45 "$PY" -m benchmarks.encoder --preset bat_base --batch 48 --dtype bfloat16 --iters 10
part probe 60 "$PY" -m benchmarks.probe --size bat_base --batch 48 --dtype bfloat16 --probes cgp --iters 5 --rounds 1
part probe_10k 60 "$PY" -m benchmarks.probe --size bat_base --batch 48 --dtype bfloat16 --probes cgp \
  --prototypes 10000 --iters 5 --rounds 1
echo "== done ($(date +%T)); figures in $OUT/"
