# One-command set-up: `make serve` or `make test` creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: serve test check lint install install-ray test-ray clean-venv

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

# Ray (issue 17) is an optional extra: without it nothing imports ray.
install-ray: $(STAMP)
	$(BIN)/pip install --quiet -e ".[ray]"

# The Ray tests run inside a loopback-only network namespace: outside one, Ray advertises the machine's
# address, listens on every interface and probes cloud metadata and a public DNS server. Root gets a plain
# network namespace; anyone else one inside a user namespace (unshare -r).
test-ray: install-ray
	RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled OMP_NUM_THREADS=1 \
	unshare -n $$([ "$$(id -u)" -eq 0 ] || echo -r) sh -c 'ip link set lo up && exec $(BIN)/python -m pytest -q -m ray tests/'

clean-venv:
	rm -rf $(VENV)
