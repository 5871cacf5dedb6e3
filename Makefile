# Two commands set everything up:  `make demo` (train, export, sample on Fashion-MNIST)
# and `make test` (the CI suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned so installs stay small; GPU users install their own torch first.
TORCH_PIN ?= torch==2.13.0

# 15-20 minutes on a 2-core CPU (77-95 images/s); raise DEMO_STEPS for better samples.
DEMO_PRESET ?= small32
DEMO_STEPS ?= 2500
DEMO_TRAIN_FLAGS ?= --batch-size 32 --lr 3e-4 --ema-decay 0.999 --save-every 250 --sample-every 500
DEMO_RUN ?= runs/demo
DEMO_BUNDLE ?= bundles/default

.PHONY: demo test test-all bench clean-demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[cpu,train,export,dev]'
	touch $@

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

$(FASHION_MNIST):
	@echo "Installing Debian's dataset-fashion-mnist (the demo's built-in data)"
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist || \
	  (echo "error: run 'sudo apt-get install dataset-fashion-mnist' first" >&2; exit 1)

# --resume: a second `make demo` (or one after Ctrl-C) continues where training stopped.
demo: $(BIN)/.installed $(FASHION_MNIST)
	$(BIN)/ssd-train --data fashion-mnist --preset $(DEMO_PRESET) --steps $(DEMO_STEPS) \
	  $(DEMO_TRAIN_FLAGS) --out $(DEMO_RUN) $$(test -f $(DEMO_RUN)/checkpoints/latest && echo --resume)
	$(BIN)/ssd-export $(DEMO_RUN) --out $(DEMO_BUNDLE) --engine onnx --engine torchscript
	$(BIN)/ssd-run $(DEMO_BUNDLE) --steps 250 --n 64 --batch 16 --out samples/demo --preview

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(BIN)/.installed
	$(BIN)/python -m pytest -q

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/train_speed.py
	$(BIN)/python benchmarks/export_bench.py
	$(BIN)/python benchmarks/runtime_speed.py
	$(BIN)/python benchmarks/runtime_memory.py
	$(BIN)/python benchmarks/ddp_speed.py

clean-demo:
	rm -rf $(DEMO_RUN) $(DEMO_BUNDLE) samples/demo
