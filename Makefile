# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench bench-full clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,agents,bench]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

demo: $(STAMP)
	$(PY) -m agents.compare --algo dqn --env-id CartPole-v1 \
		--samplers laber-mean uniform per --seeds 0 1 --out runs/demo

bench: $(STAMP)
	$(PY) perf/bench_downsample.py --quick
	$(PY) perf/bench_update.py --quick
	$(PY) perf/bench_scaling.py --quick

bench-full: $(STAMP)
	$(PY) perf/bench_downsample.py
	$(PY) perf/bench_update.py --full
	$(PY) perf/bench_scaling.py --full

clean:
	rm -rf $(VENV) build *.egg-info runs
