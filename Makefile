# moelab: `make demo` runs the main job, `make test` the tests, `make bench` the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.moelab-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: a bare `torch` requirement pulls several GB of CUDA packages.
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,hf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/moelab demo

# Tests use tiny tensors: one BLAS/OpenMP thread is faster and immune to the spin-wait slowdown
# that several threads suffer when the cores are shared (seen: 50 s vs 7 min under load).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest

bench: $(STAMP)
	@for f in benchmarks/startup.py benchmarks/moe_layer.py benchmarks/train_step.py benchmarks/generate.py benchmarks/base_assignment.py benchmarks/route.py; do \
		echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
