#!/usr/bin/env bash
# Everything the GPU has to say in one call: the compiled kernels (Triton and Mosaic GPU) against their
# references (pytest -m gpu), then every GPU benchmark (bench_kernels times Triton, Mosaic GPU and bf16
# jnp.dot side by side). A lent GPU session has 15 minutes of device time in all; the step limits add up
# to 540 s. A failing step does not stop the next. Writes session.log and the benchmarks' JSON to $OUT
# (the device tool's folder) or runs/gpu.
#   device run:  bash benchmarks/gpu_session.sh          (timeout_s 560)
# Needs only what the GPU image has (jax, flax, optax, orbax, numpy, pytest): nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${OUT:-runs/gpu}
mkdir -p "$dir"
log="$dir/session.log"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2
    shift 2
    echo "== $(date -u +%H:%M:%S) $name (limit ${limit}s): $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    echo "== $name rc=${PIPESTATUS[0]}" | tee -a "$log"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$log"
step env 30 "$py" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
step gpu_tests 140 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/pallas_kernels/test_on_gpu.py \
    tests/pallas_kernels/test_mgpu_on_gpu.py
step bench_kernels 220 "$py" benchmarks/bench_kernels.py --json "$dir/bench_kernels.json"
step bench_layer 60 "$py" benchmarks/bench_layer.py --json "$dir/bench_layer.json"
step bench_layer_w4a8_dynamic 40 "$py" benchmarks/bench_layer.py --a-bits 8 --dynamic --json "$dir/bench_layer_w4a8.json"
step bench_train 50 "$py" benchmarks/bench_train.py --model llama-3-8b --threads 0 --seqlen 1024 --samples 8 --steps 5 --json "$dir/bench_train.json"
echo "== done $(date -u +%H:%M:%S)" | tee -a "$log"
