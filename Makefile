# Two entry points on a fresh machine: `make demo` (the main job; `make demo-seg` for segmentation
# control) and `make test` (the suite).
# Both create .venv and install the project into it. constraints-cpu.txt pins the lean CPU
# wheel of torch for machines without a GPU; on a GPU machine run `make CONSTRAINTS= ...`.

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= -c constraints-cpu.txt
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1

.PHONY: demo demo-seg test app bench clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e '.[dev,train,app]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m training.demo --output_dir outputs/demo

demo-seg: $(VENV)/.installed
	$(PY) -m training.demo --task segmentation --output_dir outputs/demo-seg

# Fails when no test ran (pytest exit code 5), never passes silently.
test: $(VENV)/.installed
	$(PY) -m pytest -q --durations=15

app: $(VENV)/.installed
	$(PY) -m app

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_training.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
