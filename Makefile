# Two commands on a fresh machine: `make test` and `make run`. Both build .venv from requirements.txt first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

DATA ?=                    # Tiny ImageNet folder or zip (default: data/tiny-imagenet-200)
WEIGHTS ?= imagenet        # imagenet, random, or a path to alexnet-owt-7be5be79.pth
DEVICE ?= auto             # auto, cpu, cuda, cuda:N
FEATURES ?= runs/features  # the feature cache (the default backbone's folder)
HEAD ?= runs/head          # the head's run folder

.PHONY: setup test run demo bench gpu-check clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

TEST_WORKERS ?= auto      # pytest-xdist workers (auto: one per core); 0 runs the suite in one process
# the multi-process torchrun tests (marker multiprocess) and the app's browser tests (e2e) are left out here; .ci/run runs them

test: setup
	$(BIN)/python -m pytest -q -n $(strip $(TEST_WORKERS)) -m "not e2e and not multiprocess" tests

# the data: DATA= if given; else data/tiny-imagenet-200 (folder or zip); else fetch it there (md5-checked, progress bar)
DATA_ARGS = $(if $(strip $(DATA)),--data $(strip $(DATA)),$(if $(wildcard data/tiny-imagenet-200 data/tiny-imagenet-200.zip),,--download))

# prepare -> extract -> train the head -> report
run: setup
	$(BIN)/python run_extract.py $(DATA_ARGS) --weights $(strip $(WEIGHTS)) --device $(strip $(DEVICE)) --out $(strip $(FEATURES))
	$(BIN)/python run_train_head.py --features $(strip $(FEATURES)) --device $(strip $(DEVICE)) --out $(strip $(HEAD))

demo: setup
	$(BIN)/python -m pipeline.demo

bench: setup
	$(BIN)/python -m benchmarks.bench_extract

# on a GPU machine: the test suite, then the CUDA checks and timings -> benchmarks/results/gpu.json (~5 min)
gpu-check: setup
	$(BIN)/python -m benchmarks.gpu_check

clean:
	rm -rf runs
