# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv, install the
# project with its compiled kernels, then run. Reinstalls only when pyproject or kernel sources change.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
KERNELS := submodules/ngp-kernels
KERNEL_SOURCES := $(shell find $(KERNELS) -type f \( -name '*.cc' -o -name '*.cu' -o -name '*.h' -o -name '*.py' \
	-o -name 'CMakeLists.txt' -o -name 'pyproject.toml' \) -not -path '*/build/*' 2>/dev/null)
PIP := $(PY) -m pip --disable-pip-version-check --quiet

.PHONY: install demo demo-image test lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(KERNEL_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[dev]" "pybind11>=2.12" "scikit-build-core>=0.10" "cmake>=3.24" ninja
	@if [ -f $(KERNELS)/pyproject.toml ]; then \
		echo "building $(KERNELS)"; $(PIP) install --no-build-isolation ./$(KERNELS); fi
	@touch $@

# The whole pipeline on built-in procedural data, no network: encode a dataset into fields, tokenize,
# train and sample two hypernets, evaluate, and write runs/demo/report.md (8 min 47 s on a fresh clone of an idle 2-core CPU).
# Rerunning resumes: finished stages are skipped.
demo: install
	$(PY) -m hypernets.pipeline --preset demo --workdir runs/demo

# The first demo: fit one image field to scikit-image's astronaut (a few seconds).
demo-image: install
	$(PY) -m fields.ngp_image --image skimage:astronaut --preset default --workdir runs/demo-image --overwrite
	@echo "demo-image outputs: runs/demo-image/render.png runs/demo-image/metrics.json runs/demo-image/field.safetensors"

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) -m scripts.bench_ngp_image

clean:
	rm -rf $(VENV) build runs .pytest_cache .ruff_cache
