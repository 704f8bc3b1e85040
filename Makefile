# The two commands a new user runs: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/mnist1d_dynmoe.py
WORKDIR ?= workdir/mnist1d_dynmoe

.PHONY: install train test bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VPY) -m dynmoe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR)

# Two workers: most tests are single-threaded compiles, and CI has 2 cores.
# pytest exits 5 when it collects no test; that must fail, and it does because make propagates it.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --durations=15 tests

bench: $(STAMP)
	$(VPY) experiments/bench_layer.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
