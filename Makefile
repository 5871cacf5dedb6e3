# Two commands set everything up:  `make demo` (train, export, sample on Fashion-MNIST)
# and `make test` (the CI suite). Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch, pinned so installs stay small; GPU users install their own torch first.
TORCH_PIN ?= torch==2.13.0

DEMO_PRESET ?= small32
DEMO_STEPS ?= 3000
DEMO_RUN ?= runs/demo
DEMO_BUNDLE ?= bundles/default

.PHONY: demo test test-all bench clean-demo

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[train,export,dev]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/ssd-train --data fashion-mnist --preset $(DEMO_PRESET) --steps $(DEMO_STEPS) --out $(DEMO_RUN) --resume
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

clean-demo:
	rm -rf $(DEMO_RUN) $(DEMO_BUNDLE) samples/demo
