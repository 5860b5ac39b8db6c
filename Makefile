# Two commands do all set-up from a fresh clone: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
export XLA_FLAGS ?=
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv test test-all lint demo clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check lavin_jax configs tests launch

# The default suite covers every path once; slow end-to-end tests (SIGKILL-and-rerun, AOT
# compiles, big renders, worker processes) run with `make test-all`.
test: venv lint
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -m "not slow" tests

test-all: venv lint
	JAX_PLATFORMS=cpu $(PY) -m pytest -q tests

demo: venv
	$(PY) -m lavin_jax.demo --workdir=$(WORKDIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
