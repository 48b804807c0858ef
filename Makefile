# One-command set-up: `make serve` or `make test` creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: serve test check lint install clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/capguard serve

# the whole suite: README and .ci/run
test: $(STAMP)
	$(BIN)/python -m pytest -q

# the inner loop (< 90 s on 2 cores): lint, then every test not marked slow
check: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check models server tests bench capguard

clean-venv:
	rm -rf $(VENV)
