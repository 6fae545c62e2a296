# Quick start: `make demo` (a tiny model forgets two facts, side by side with retraining), `make test`.
# `make` alone sets up .venv and says how to put `lmclean` on PATH.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: setup demo test bench clean
.DEFAULT_GOAL := setup

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)   # CPU wheel first: an unpinned torch pulls CUDA builds
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)
	@echo "lmclean is installed in $(BIN): run 'source $(BIN)/activate' to put it on PATH"

demo: $(STAMP)
	bash examples/demo.sh

test: $(STAMP)
	# two workers (pytest-xdist), one torch thread each: on 2 cores faster than one process with 2 threads
	OMP_NUM_THREADS=1 LMCLEAN_TEST_THREADS=1 $(BIN)/python -m pytest -p no:cacheprovider -n 2 --dist loadscope tests

bench: $(STAMP)
	$(BIN)/python benchmarks/record_overhead.py

clean:
	rm -rf runs out
