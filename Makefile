# The two commands a new user runs: `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/mnist1d_dynmoe.py
# One workdir per config, so a second config never lands in the first one's run.
WORKDIR ?= workdir/$(basename $(notdir $(CONFIG)))
# Config overrides, e.g. make train ARGS='--config.num_train_steps=500 --config.seed=1'
ARGS ?=

.PHONY: install train test test-fast bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(VPY) -m dynmoe_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

# Two workers: most tests are single-threaded compiles, and CI has 2 cores. loadfile keeps a
# file's tests on one worker, so a fixture they share (an 8-device export run, a reference
# training run) is computed once. (xdist_group/loadgroup would be finer, but pytest-xdist
# 3.8 cannot rename node ids under pytest 9.2, so its groups are silently ignored.)
# pytest exits 5 when it collects no test; that must fail, and it does because make propagates it.
PYTEST_WORKERS ?= 2
PYTEST := $(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile
test: $(STAMP)
	$(PYTEST) --durations=15 tests

# Everything but the end-to-end runs (marked slow): about 2.5 minutes on 2 cores.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

bench: $(STAMP)
	$(VPY) experiments/bench_layer.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
