# moelab: `make demo` runs the main job, `make test` the tests, `make bench` the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Override the torch build: `make install TORCH_PIN="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128`
# (README, "Installing"). TORCH_INDEX empty = PyPI's default wheel for this platform.
TORCH_PIN ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.moelab-installed

.PHONY: demo test bench install clean wheel-check

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: a bare `torch` requirement pulls several GB of CUDA packages.
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PIN)"
	$(PY) -m pip install -q -e '.[dev,hf,serve]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moelab demo

# Tests use tiny tensors: one BLAS/OpenMP thread is faster and immune to the spin-wait slowdown
# that several threads suffer when the cores are shared (seen: 50 s vs 7 min under load).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest

bench: $(STAMP)
	@for f in benchmarks/startup.py benchmarks/moe_layer.py benchmarks/train_step.py benchmarks/generate.py benchmarks/base_assignment.py benchmarks/route.py benchmarks/threads.py benchmarks/hf_interop.py; do \
		echo "== $$f"; $(PY) $$f || exit 1; done

# Build the wheel and sdist, install the wheel into a clean venv, run `moelab --version` and a forward.
wheel-check: $(STAMP)
	bash .ci/wheel_check $(PY)

clean:
	rm -rf $(VENV) .pytest_cache
