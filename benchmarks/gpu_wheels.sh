#!/usr/bin/env bash
# Wheels for benchmarks/gpu_check.sh, made here (the device machine is offline): the packages
# the device image lacks, at the versions this checkout's environment runs its tests with, for
# the image's Python 3.12 on x86-64 Linux. Writes .whl/ (git-ignored via .git/info/exclude);
# then carry it: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=...).
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
PACKAGES="diffusers peft transformers accelerate tokenizers huggingface_hub safetensors regex importlib_metadata zipp"
pins=$("$PY" - "$PACKAGES" <<'EOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1].split()))
EOF
)
mkdir -p .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
echo "downloading: $pins"
# shellcheck disable=SC2086
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    -d .whl $pins
du -sh .whl
