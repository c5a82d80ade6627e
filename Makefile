# knnlm: set-up and everyday commands. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of torch is installed first so that nothing pulls a multi-GB CUDA build;
# on a GPU machine use e.g. `make install TORCH=torch GPU=1`.
TORCH ?= torch==2.13.0
GPU ?= 0
FAIRSEQ := $(shell $(PYTHON) -c 'import sys; print("fairseq-fixed==0.12.3.1" if sys.version_info >= (3, 11) else "fairseq==0.12.2")')

.PHONY: install demo test lint bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)' 'setuptools>=64' wheel cython 'numpy>=1.24'
	# fairseq-fixed ships only a source archive whose C++ extensions build against torch: built in
	# an isolated environment, pip would first fetch a multi-GB CUDA torch there (most of the install
	# time); built here, it uses the torch just installed
	$(BIN)/pip install --quiet --no-build-isolation $(FAIRSEQ)
	$(BIN)/pip install --quiet -e '.[dev]'
ifeq ($(GPU),1)
	# faiss-gpu and faiss-cpu install the same `faiss` module: keep only the GPU one
	$(BIN)/pip uninstall --yes faiss-cpu
	$(BIN)/pip install --quiet --force-reinstall --no-deps 'faiss-gpu-cu12>=1.8.0'
endif
	touch $@

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check knnlm tests benchmarks scripts

bench: install
	PATH="$(abspath $(BIN)):$$PATH" bash benchmarks/run_all.sh

clean-demo:
	rm -rf runs/demo
