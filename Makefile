# Two commands do all the set-up on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo compare continuous small-batch small-batch-nstep ladder bench bench-full bench-kernel gpu-check compat clean

# pyproject.toml states the supported ranges; CI installs the one combination it tests.
# --no-cache-dir: the venv is about 6.6 GB (torch's CUDA build); pip's cache would add each download
# again, and a CI run has failed on a full disk.
$(STAMP): pyproject.toml constraints/ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -c constraints/ci.txt -e ".[test,agents,bench,distributed,loggers]"
	touch $(STAMP)

install: $(STAMP)

# Lint and format first (seconds), then two workers (pytest-xdist); loadgroup keeps the Ray tests in one
# worker (one cluster at a time).
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup

demo: $(STAMP)
	$(PY) -m experiments.compare --algo dqn --env-id CartPole-v1 \
		--samplers laber-mean uniform per --seeds 0 1 --out runs/demo

# The longer comparison (docs/results/compare.md): laber-mean against uniform, large-batch and per, 3 seeds each;
# about 70 minutes on 2 cores (105 with the SAC and TD3 Pendulum runs it held before `continuous`, by
# their recorded wall times). MinAtar is cut to what a 2-core machine allows.
COMPARE := $(PY) -m experiments.compare --samplers laber-mean uniform large-batch per --seeds 0 1 2
compare: $(STAMP)
	$(COMPARE) --algo dqn --env-id CartPole-v1 --out runs/compare/dqn-cartpole
	$(COMPARE) --algo dqn --env-id Acrobot-v1 --out runs/compare/dqn-acrobot
	$(COMPARE) --algo dqn --env-id MinAtar/Breakout-v1 --total-steps 40000 \
		--extra="--exploration-steps 20000 --eval-every 5000" --out runs/compare/dqn-breakout

# SAC and TD3 (docs/results/continuous.md, issue 23): uniform, per and laber-mean, 5 seeds, two runs at a
# time. On 2 cores: Pendulum about 36 minutes an algorithm, Hopper 38-49, HalfCheetah 22 (TD3) and 32
# (SAC); about 3.6 hours in all (2.3 hours on the faster VM of the 2026-12-07 rerun). --reuse keeps finished runs and resumes interrupted ones from
# their checkpoints, so an interrupted `make continuous` picks up where it stopped.
CONTINUOUS := $(PY) -m experiments.compare --samplers uniform per laber-mean --seeds 0 1 2 3 4 --jobs 2 --reuse \
	--extra="--eval-every 1000 --checkpoint-every 2000"
continuous: $(STAMP)
	for algo in td3 sac; do $(CONTINUOUS) --algo $$algo --env-id Pendulum-v1 --total-steps 8000 --out runs/continuous/$$algo-Pendulum; done
	for env in Hopper HalfCheetah; do for algo in td3 sac; do \
		$(CONTINUOUS) --algo $$algo --env-id $$env-v5 --total-steps 10000 --out runs/continuous/$$algo-$$env; done; done

# The small-batch study (docs/results/small-batch.md): uniform against laber-mean at batch sizes 8 to 128, the same number of
# gradient steps at every size, diagnostics (srank, dormant neurons, gradient variance) along the way;
# MinAtar cut as in `compare`. --reuse keeps the runs already finished, so an interrupted study resumes.
# The diagnostics draw 512 rows at every batch size (m * B would move srank and the TVs with B).
# CartPole measured (about 26 minutes, on m * B rows before --diagnostics-rows: `make
# small-batch` reruns it, with the same returns); MinAtar Breakout measured with 512 rows (about
# 30-40 minutes a seed on an idle 2-core machine, under 2 hours for the 3 seeds).
SMALL_BATCH := $(PY) -m experiments.compare --algo dqn --samplers uniform laber-mean --seeds 0 1 2 --batch-sizes 8 16 32 64 128 --reuse
small-batch: $(STAMP)
	$(SMALL_BATCH) --env-id CartPole-v1 --total-steps 20000 --extra="--diagnostics-every 2500 --diagnostics-rows 512" \
		--out runs/small-batch/cartpole
	$(SMALL_BATCH) --env-id MinAtar/Breakout-v1 --total-steps 40000 \
		--extra="--exploration-steps 20000 --eval-every 5000 --diagnostics-every 5000 --diagnostics-rows 512" \
		--out runs/small-batch/breakout

# The CartPole sweep again with 3-step returns (docs/results/small-batch-nstep.md, issue 30): the small-batch thesis
# predicts its effect only with multi-step returns. 30 runs, two at a time; the page is written from their CSV.
small-batch-nstep: $(STAMP)
	$(SMALL_BATCH) --env-id CartPole-v1 --total-steps 20000 --jobs 2 --extra="--n-step 3" --out runs/small-batch/cartpole-nstep3
	$(PY) -m experiments.nstep_sweep --runs runs/small-batch/cartpole-nstep3

# The surrogate ladder and the paper's samplers (docs/results/ladder.md): DQN, 3 seeds, in one table per task: laber-mean
# at each rung (output, last-layer, exact), GER, PER-LaBER and GER-LaBER against uniform and PER.
# CartPole-v1 30k steps with diagnostics every 2500 steps; one laber-mean run on each MinAtar game with diagnostics
# every 3000 steps (the conv net's diagnostics table); MinAtar Breakout and SpaceInvaders 30k steps (learning
# only, about 72 and 90 minutes on 2 cores). --reuse keeps the runs already finished.
LADDER := $(PY) -m experiments.compare --algo dqn --seeds 0 1 2 --total-steps 30000 --reuse \
	--samplers uniform per laber-mean "laber-mean-last-layer=laber-mean --surrogate last-layer" \
	"laber-mean-exact=laber-mean --surrogate exact" ger per-laber-mean ger-laber-mean
ladder: $(STAMP)
	$(LADDER) --env-id CartPole-v1 --extra="--diagnostics-every 2500" --out runs/ladder/dqn-cartpole
	for game in Breakout SpaceInvaders; do $(PY) -m experiments.compare --algo dqn --seeds 0 --total-steps 30000 --reuse \
		--samplers laber-mean --env-id MinAtar/$$game-v1 --extra="--diagnostics-every 3000" \
		--out runs/ladder/minatar-$$(echo $$game | tr A-Z a-z)-diagnostics || exit 1; done
	$(LADDER) --env-id MinAtar/Breakout-v1 --out runs/ladder/minatar-breakout
	$(LADDER) --env-id MinAtar/SpaceInvaders-v1 --out runs/ladder/minatar-spaceinvaders

# The benchmarks write their CSV files to runs/perf/ (ignored); `make bench UPDATE_RESULTS=1` to the committed
# perf/results/, which the docs quote.
export UPDATE_RESULTS
bench: $(STAMP)
	$(PY) -m perf.bench_downsample --quick
	$(PY) -m perf.bench_update --quick
	$(PY) -m perf.bench_scaling --quick
	$(PY) -m perf.bench_gradnorms --quick

bench-full: $(STAMP)
	$(PY) -m perf.bench_downsample
	$(PY) -m perf.bench_update --full
	$(PY) -m perf.bench_scaling --full
	$(PY) -m perf.bench_gradnorms

# The fused kernel against the naive torch path (CUDA; without a GPU it says so and exits 0).
bench-kernel: $(STAMP)
	$(PY) -m perf.bench_kernel

# On a GPU machine, with the interpreter at hand (no venv): `make gpu-check PYTHON=python3`. Runs the
# GPU tests (pytest -m gpu), perf.bench_kernel and perf.bench_update on CUDA, each under a time
# limit (7.5 minutes in all), keeps going when one fails, and writes each step's log, *_cuda.csv and
# gpu_summary_cuda.md to $OUT (else $GPU_RESULTS_DIR, else perf/results) as each is written; exits
# non-zero when a step failed. See ../shared/gpu/README.md.
gpu-check:
	$(PYTHON) -m perf.gpu_check

# Not in CI: the whole suite on the oldest supported combination (torch 2.11, torchrl 0.11.1, tensordict
# 0.11: what the GPU machine's image has), agents included, in a venv of its own. The first H200 run
# failed on torchrl 0.11's logger API and dynamo 2.11's tracing of an Enum, both visible here on CPU.
# Left out: Ray (pinned for torchrl 0.14) and the kernel under the Triton 3.6 interpreter (a
# numpy-scalar TypeError in the interpreter; the ahead-of-time compiles run).
COMPAT_VENV ?= .venv-compat
compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --no-cache-dir -c constraints/oldest.txt -e ".[test,agents,loggers]"
	$(COMPAT_VENV)/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --ignore=tests/test_distributed.py \
		--deselect tests/kernels/test_laber_kernel.py::test_kernel_under_the_interpreter_matches_reference

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info runs
