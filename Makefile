# align_bench — `make demo` and `make test` work on a fresh machine with Python ≥ 3.10 and nothing else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-fast tiny-world bench reproduce-tables gpu-smoke clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)  ## create the virtual environment and install align_bench with its test dependencies

demo: $(STAMP)  ## DDPO on the embedded tiny world (a few minutes on a laptop CPU); prints the eval table
	$(PY) train.py experiment=tiny_ddpo

lint: $(STAMP)  ## ruff (configured in pyproject.toml): pyflakes, pycodestyle, bugbear
	$(PY) -m ruff check src tests benchmarks train.py

test: $(STAMP)  ## the whole test suite (< 15 minutes on 2 CPU cores)
	$(PY) -m pytest -q

test-fast: $(STAMP)  ## everything but the end-to-end training runs
	$(PY) -m pytest -q -m "not slow"

tiny-world: $(STAMP)  ## rebuild the embedded tiny world from scratch (fixed seeds, ≤ 75 min on 2 CPU cores; tiny-turbo included)
	$(PY) -m align_bench.tiny.build --out assets/tiny-world

PRESET ?= tiny
reproduce-tables: $(STAMP)  ## the comparison (experiments/specs/$(PRESET).yaml): launch missing runs, then tables + plots; QUICK=1: one seed
	$(PY) -m align_bench.study experiments/specs/$(PRESET).yaml $(if $(QUICK),--quick)

BENCH_ARGS ?=
bench: $(STAMP)  ## speed and memory as ratios to stock diffusers / the compute floor → benchmarks/results/<machine>.md (BENCH_ARGS=--quick)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

gpu-smoke: $(STAMP)  ## one DDPO update of each real model × reward (needs a GPU + checkpoints; says what it skipped)
	$(PY) -m pip install -q -e ".[rewards]"
	$(PY) tests/scripts/gpu_smoke.py

clean:
	rm -rf runs multirun outputs .pytest_cache
