#!/usr/bin/env bash
# One device run for the fused butterfly kernel: the CUDA correctness tests, then the timings.
# Writes everything under $OUT (the device tool's folder; /tmp/boft_gpu_out elsewhere).
# Uses the machine's own python3 (torch + triton with CUDA); .whl/ may carry pure-Python
# packages it lacks (diffusers, which `import boft_diffusion` needs).
set -uo pipefail
OUT=${OUT:-/tmp/boft_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, \
'numpy', numpy.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/versions.txt"
start=$(date +%s)
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider --noconftest \
    2>&1 | tee "$OUT/pytest_gpu.txt"
echo "tests: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest_gpu.txt"
start=$(date +%s)
timeout "${BENCH_TIMEOUT:-230}" python3 benchmarks/kernel_gpu.py --out "$OUT/kernel_gpu.json" --sweep "$@" \
    2>&1 | tee "$OUT/bench.txt"
echo "benchmark: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.txt"
