#!/usr/bin/env bash
# One device run answering the kernel and the end-to-end questions:
#   1. the CUDA correctness tests of the fused butterfly kernel,
#   2. the kernel timings (benchmarks/kernel_gpu.py --sweep),
#   3. the SD 1.5 training step at 64x64 latents (512 px): ours vs PEFT LoRA vs PEFT BOFT, with
#      bf16 and fp16 frozen weights under autocast (adapters in fp32), one process per mode
#      (benchmarks/bench_training.py, the same script as the CPU table).
# Writes everything under $OUT (the device tool's folder; /tmp/boft_gpu_out elsewhere).
# Uses the machine's own python3 (torch + triton with CUDA); the pure-Python and small binary
# packages it lacks (diffusers, peft, transformers, ...) come as wheels in .whl/, made here from
# this checkout's own environment by benchmarks/gpu_wheels.sh (same versions as the tests use).
#
# DRY_RUN=1 checks the script on a CPU: kernels in Triton's interpreter with tiny sizes, the
# training step on the tiny model; its times mean nothing. PYTHON picks the interpreter.
set -uo pipefail
OUT=${OUT:-/tmp/boft_gpu_out}
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
"$PY" -c "import torch, triton, numpy, diffusers, peft; print('torch', torch.__version__, 'triton', triton.__version__, \
'numpy', numpy.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" 2>&1 | tee "$OUT/versions.txt"

start=$(date +%s)
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest tests/test_kernels.py -m gpu -q -p no:cacheprovider --noconftest \
    2>&1 | tee "$OUT/pytest_gpu.txt"
echo "tests: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest_gpu.txt"

start=$(date +%s)
if [ "$DRY_RUN" = 1 ]; then
    kernel_args=(--dry-run --dims 64 128 --rows 40 --repeats 1)
else
    kernel_args=(--sweep)
fi
timeout "${BENCH_TIMEOUT:-230}" "$PY" benchmarks/kernel_gpu.py --out "$OUT/kernel_gpu.json" "${kernel_args[@]}" \
    2>&1 | tee "$OUT/bench.txt"
echo "benchmark: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/bench.txt"

if [ "$DRY_RUN" = 1 ]; then
    train_args=(--models tiny --device cpu --steps 1 --peft_steps 1)
else  # random-init SD 1.5 weights are made once (first dtype) and reused by every mode
    train_args=(--models sd15 --latent 64 --device cuda --steps 5 --peft_steps 3 --threads 8
                --weights /tmp/boft_sd15_random.pt)
fi
for dtype in ${TRAIN_DTYPES:-bf16 fp16}; do
    start=$(date +%s)
    timeout "${TRAIN_TIMEOUT:-180}" "$PY" benchmarks/bench_training.py "${train_args[@]}" --dtype "$dtype" \
        --modes "${TRAIN_MODES:-lora,peft_boft,ours}" --out "$OUT/train_sd15_64_$dtype.json" 2>&1 | tee -a "$OUT/train.txt"
    echo "training step $dtype: rc=${PIPESTATUS[0]} in $(( $(date +%s) - start )) s" | tee -a "$OUT/train.txt"
done
