# The two commands of the README do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# Two installs into the same .venv, both under the pinned versions of requirements-dev.txt:
# the demo and the benchmarks need the `lab` extra only; the tests, lint and docs also need
# `dev` (pytest, ONNX, Keras, MkDocs, Triton: about 1.3 GB more), installed on first use.
LAB    := $(VENV)/.installed-lab
STAMP  := $(VENV)/.installed

.PHONY: demo test fuzz bench lint format docs clean

$(LAB): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements-dev.txt -e ".[lab]"
	touch $(LAB)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements-dev.txt -e ".[lab,dev]"
	touch $(LAB) $(STAMP)

demo: $(LAB)
	$(PY) -m batchnorm demo

# Two worker processes: the suite's time is mostly single-threaded (Numba compiles, the
# Triton interpreter, small tensors), so on the CI's two cores it takes about 4/5 of a
# single process's (523 s against 668 s, 2026-12-04). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The differential fuzz test of batchnorm.functional.batch_norm with many more examples
# than `make test` runs (tests/test_fuzz.py).
fuzz: $(STAMP)
	BATCHNORM_FUZZ_EXAMPLES=5000 $(PY) -m pytest -q tests/test_fuzz.py

# Results go to benchmarks/results/, the committed ones (`batchnorm bench` alone writes to
# ~/.cache/batchnorm/bench).
bench: $(LAB)
	$(PY) -m batchnorm bench --out benchmarks/results/cpu_kernels.json
	$(PY) benchmarks/suite.py
	$(PY) benchmarks/models.py benchmarks/results/models.json
	$(PY) benchmarks/small_layers.py benchmarks/results/small_layers.json
	$(PY) benchmarks/half_layers.py benchmarks/results/half_layers.json

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info batchnorm-report site
