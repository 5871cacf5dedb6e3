# Two commands set everything up:  `make demo` (sample the shipped Fashion-MNIST model) and
# `make test` (the CI suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned so installs stay small; GPU users install their own torch first.
# PyTorch's CPU wheel index is tried first; where it cannot be reached the same pin comes from
# the default index (a CPU build where one is at hand, else PyPI's larger CUDA build), and the
# install says which it got.
TORCH_PIN ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

# The shipped model's packaged bundle (runtime/models/fashion-mnist-bundle), sampled directly:
# no export. 250 steps: the project measured the same FID as 1000 within the intervals
# (docs/results.md); DEMO_STEPS=1000 for the full schedule.
DEMO_STEPS ?= 250
DEMO_N ?= 64
DEMO_OUT ?= samples
DEMO_BUNDLE ?= bundles/default
# Retraining it from scratch (make train-demo): the exact recipe of the shipped model.
TRAIN_PRESET ?= small32
TRAIN_STEPS ?= 10000
TRAIN_FLAGS ?= --levels 3 --batch-size 32 --lr 3e-4 --ema-decay 0.9995 --save-every 1000 --sample-every 2000 --sample-steps 100
TRAIN_RUN ?= runs/demo

.PHONY: demo train-demo test test-all bench clean-demo web

# The browser page's ONNX Runtime Web (ssd-web), from the npm registry as runtime/web/package-lock.json pins it.
# Where npm is missing it comes from Debian (as root); without it the page cannot be served and its tests skip.
WEB_ORT := runtime/web/node_modules/.package-lock.json

$(WEB_ORT): runtime/web/package-lock.json
	@command -v npm >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq nodejs npm) >/dev/null 2>&1 || true
	@if command -v npm >/dev/null 2>&1; then npm ci --prefix runtime/web --ignore-scripts --no-audit --no-fund --loglevel=error || \
	  echo "note: npm ci failed: ssd-web cannot serve the page and its tests are skipped"; \
	  else echo "note: npm is missing (sudo apt-get install npm): ssd-web cannot serve the page and its tests are skipped"; fi

web: $(WEB_ORT)

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@echo "torch: $(TORCH_PIN), from PyTorch's CPU wheel index where it can be reached"
	@$(BIN)/pip install --quiet --retries 0 --timeout 15 --index-url $(TORCH_CPU_INDEX) $(TORCH_PIN) 2>/dev/null || \
	  (echo "torch: that index is out of reach; $(TORCH_PIN) from the default index" && \
	   $(BIN)/pip install --quiet $(TORCH_PIN))
	@$(BIN)/python -c "import torch; print('torch: installed', torch.__version__, \
	  '(a CUDA build)' if torch.version.cuda else '(the CPU build)')"
	$(BIN)/pip install --quiet -e '.[cpu,train,export,dev,openvino,eval]'
	touch $@

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

$(FASHION_MNIST):
	@echo "Installing Debian's dataset-fashion-mnist (the demo's built-in data)"
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist || \
	  (echo "error: run 'sudo apt-get install dataset-fashion-mnist' first" >&2; exit 1)

demo: $(BIN)/.installed $(WEB_ORT)
	$(BIN)/ssd-run --steps $(DEMO_STEPS) --n $(DEMO_N) --batch 16 --out $(DEMO_OUT) --preview

# --resume: a second `make train-demo` (or one after Ctrl-C) continues where training stopped.
train-demo: $(BIN)/.installed $(FASHION_MNIST)
	$(BIN)/ssd-train --data fashion-mnist --preset $(TRAIN_PRESET) --steps $(TRAIN_STEPS) \
	  $(TRAIN_FLAGS) --out $(TRAIN_RUN) $$(test -f $(TRAIN_RUN)/checkpoints/latest && echo --resume)
	$(BIN)/python -m ssd.release $(TRAIN_RUN) --out $(TRAIN_RUN)-release --force
	$(BIN)/ssd-export $(TRAIN_RUN)-release --out $(DEMO_BUNDLE) --engine onnx --engine torchscript --force
	$(BIN)/ssd-run $(DEMO_BUNDLE) --steps $(DEMO_STEPS) --n $(DEMO_N) --batch 16 --out $(DEMO_OUT)/retrained --preview

# The tests that score against Fashion-MNIST need Debian's dataset-fashion-mnist, and the C++
# tests cmake, g++ and the Python headers: installed where apt can (as root, as CI does), else those tests are
# skipped and this says so.
test: $(BIN)/.installed $(WEB_ORT)
	@test -f $(FASHION_MNIST) || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
	  echo "note: dataset-fashion-mnist is not installed (sudo apt-get install dataset-fashion-mnist): the tests that need it are skipped"
	@(command -v cmake && command -v g++ && $(BIN)/python -c "import os, sys, sysconfig; \
	  sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))") >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq cmake g++ python3-dev) >/dev/null 2>&1 || \
	  echo "note: cmake, g++ or the Python headers are missing (sudo apt-get install cmake g++ python3-dev): the C++ tests are skipped"
	@(command -v chromium && command -v chromedriver) >/dev/null 2>&1 || \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || \
	  echo "note: chromium is missing (sudo apt-get install chromium chromium-driver): the browser page's tests are skipped"
	$(BIN)/python -m pytest -q -m "not slow" --durations=20 -rs

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/export_bench.py
	$(BIN)/python benchmarks/runtime_speed.py
	$(BIN)/python benchmarks/fused_speed.py
	$(BIN)/python benchmarks/runtime_memory.py
	$(BIN)/python benchmarks/ddp_speed.py
	$(BIN)/python benchmarks/run_all.py

clean-demo:
	rm -rf $(TRAIN_RUN) $(DEMO_BUNDLE) $(DEMO_OUT)
