# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo compare bench bench-full clean

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

# The longer comparison README.md reports (about 105 minutes on 2 cores): laber-mean against uniform,
# large-batch and per, 3 seeds each. MinAtar and Pendulum are cut to what a 2-core machine allows.
COMPARE := $(PY) -m agents.compare --samplers laber-mean uniform large-batch per --seeds 0 1 2
compare: $(STAMP)
	$(COMPARE) --algo dqn --env-id CartPole-v1 --out runs/compare/dqn-cartpole
	$(COMPARE) --algo dqn --env-id Acrobot-v1 --out runs/compare/dqn-acrobot
	$(COMPARE) --algo dqn --env-id MinAtar/Breakout-v1 --total-steps 40000 \
		--extra="--exploration-steps 20000 --eval-every 5000" --out runs/compare/dqn-breakout
	$(COMPARE) --algo sac --env-id Pendulum-v1 --total-steps 8000 --extra="--eval-every 1000" --out runs/compare/sac-pendulum
	$(COMPARE) --algo td3 --env-id Pendulum-v1 --total-steps 8000 --extra="--eval-every 1000" --out runs/compare/td3-pendulum

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
