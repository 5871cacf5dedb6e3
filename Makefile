# Two commands set everything up:  `make demo` (export the shipped Fashion-MNIST model and
# sample it) and `make test` (the CI suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned so installs stay small; GPU users install their own torch first.
TORCH_PIN ?= torch==2.13.0

# The shipped model (runtime/models/fashion-mnist, package data, see README) exported and sampled:
# a few minutes. (A wheel install gets the same model from `ssd-run` with no bundle.)
DEMO_MODEL ?= runtime/models/fashion-mnist
DEMO_BUNDLE ?= bundles/default
DEMO_OUT ?= samples
# Retraining it from scratch (make train-demo): the exact recipe of the shipped model.
TRAIN_PRESET ?= small32
TRAIN_STEPS ?= 10000
TRAIN_FLAGS ?= --levels 3 --batch-size 32 --lr 3e-4 --ema-decay 0.9995 --save-every 1000 --sample-every 2000 --sample-steps 100
TRAIN_RUN ?= runs/demo

.PHONY: demo train-demo test test-all bench clean-demo

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[cpu,train,export,dev,openvino,eval]'
	touch $@

FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

$(FASHION_MNIST):
	@echo "Installing Debian's dataset-fashion-mnist (the demo's built-in data)"
	apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist || \
	  (echo "error: run 'sudo apt-get install dataset-fashion-mnist' first" >&2; exit 1)

demo: $(BIN)/.installed
	$(BIN)/ssd-export $(DEMO_MODEL) --out $(DEMO_BUNDLE) --engine onnx --engine torchscript
	$(BIN)/ssd-run $(DEMO_BUNDLE) --steps 1000 --n 64 --batch 16 --out $(DEMO_OUT) --preview

# --resume: a second `make train-demo` (or one after Ctrl-C) continues where training stopped.
train-demo: $(BIN)/.installed $(FASHION_MNIST)
	$(BIN)/ssd-train --data fashion-mnist --preset $(TRAIN_PRESET) --steps $(TRAIN_STEPS) \
	  $(TRAIN_FLAGS) --out $(TRAIN_RUN) $$(test -f $(TRAIN_RUN)/checkpoints/latest && echo --resume)
	$(BIN)/python -m ssd.release $(TRAIN_RUN) --out $(TRAIN_RUN)-release --force
	$(BIN)/ssd-export $(TRAIN_RUN)-release --out $(DEMO_BUNDLE) --engine onnx --engine torchscript --force
	$(BIN)/ssd-run $(DEMO_BUNDLE) --steps 1000 --n 64 --batch 16 --out $(DEMO_OUT) --preview

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow" --durations=20

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
