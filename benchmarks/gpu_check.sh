#!/usr/bin/env bash
# The GPU check, as one prepared script (run on a lent GPU machine from the repo root; CI never has a GPU).
# Runs the numerical core tests on the GPU in float64, then the benchmarks at full size, and writes the
# logs and JSON records to $OUT (default ./gpu_out). Uses the machine's own jax/optax/flax (no install):
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, jaxlib, optax, flax, chex; print('jax', jax.__version__, jax.devices())" | tee "$OUT/env.txt"
# Core numerics on the GPU (x64 via tests/conftest.py), compiled as users compile them (the suite's
# default is LLVM -O0, see tests/conftest.py). Warnings are not errors here: the GPU image's packages may
# warn about things CI never sees. One process (`-o addopts=` drops pyproject's 2 xdist workers: two
# processes would each preallocate most of the GPU's memory, and the image may lack pytest-xdist).
JAX_DISABLE_MOST_OPTIMIZATIONS=0 timeout 240 python3 -m pytest -q -p no:cacheprovider -o filterwarnings= -o addopts= \
  tests/test_adjoint.py tests/test_dual.py tests/test_closed_forms.py tests/test_scores.py \
  tests/test_streaming.py tests/test_projected.py tests/test_sampling.py 2>&1 | tail -25 | tee "$OUT/pytest_gpu.txt"
# The benchmarks' baselines are user-style code at JAX's default precision, which is TF32 for float32 on
# NVIDIA GPUs: run them at full precision so the correctness checks compare like with like.
export JAX_DEFAULT_MATMUL_PRECISION=highest
timeout 120 python3 benchmarks/bench_scores.py --quiet --svd-reps 1 --out "$OUT/bench_scores_gpu.json" 2>&1 | tail -5
timeout 150 python3 benchmarks/bench_adjoint.py --quiet --budget 5 --out "$OUT/bench_adjoint_gpu.json" 2>&1 | tail -5
# Out of core: a 10^7-row float32 file (2.56 GB, written in chunks to $OUT/stream, then deleted) streamed
# host -> GPU; the record has rows/s and input bytes/s, to set against the card's memory bandwidth
# (gpu.txt) and the host->device link.
# Two runs, so that a timeout at 10^7 still leaves the 10^6 record.
timeout 150 python3 benchmarks/bench_streaming.py --quiet --n 1000000 --dir "$OUT/stream" \
  --out "$OUT/bench_streaming_gpu.json" 2>&1 | tail -5
timeout 240 python3 benchmarks/bench_streaming.py --quiet --n 10000000 --dir "$OUT/stream" \
  --out "$OUT/bench_streaming_1e7_gpu.json" 2>&1 | tail -5
rm -rf "$OUT/stream"
[ -f gpu_diag.py ] && timeout 60 python3 gpu_diag.py 2>&1 | tail -20
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    rec = json.loads(f.read_text())
    print(f.name, json.dumps(rec)[:2500])
PY
