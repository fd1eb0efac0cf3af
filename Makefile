# Two entry points do all set-up on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel here; elsewhere set TORCH="torch" (or any spec) for the platform's normal build.
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup browser train test test-fast lint format summary dist clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,onnx,serve,scale]"
	touch $(STAMP)

setup: $(STAMP)

# Data: $GOOGLENET_DATA, else the shared copy beside the project, else ./data (downloaded).
DATA ?= $(or $(GOOGLENET_DATA),$(wildcard ../shared/datasets),data)

# The main job: train the default recipe (cifar10-fast) on CIFAR-10.
train: $(STAMP)
	$(VENV)/bin/googlenet train --data "$(DATA)" $(ARGS)

# Browser tests drive the system Chromium; install it on Debian when root, else they skip.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  grep -qx 'ID=debian' /etc/os-release 2>/dev/null && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "note: no Chromium here (Debian + root installs it); browser tests will be skipped"

test: $(STAMP) browser
	$(PY) -m ruff check src tests bench hubconf.py
	$(PY) -m ruff format --check src tests bench hubconf.py
	$(PY) -m pytest $(ARGS)

# The quick loop while editing: no slow, real-CIFAR or browser tests (about a minute).
test-fast: $(STAMP)
	$(PY) -m ruff check src tests bench hubconf.py
	$(PY) -m pytest -m "not slow and not cifar and not browser" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests bench hubconf.py

format: $(STAMP)
	$(PY) -m ruff format src tests bench hubconf.py
	$(PY) -m ruff check --fix src tests bench hubconf.py

summary: $(STAMP)
	$(VENV)/bin/googlenet summary $(ARGS)

# The sdist and the wheel in dist/, built offline with the venv's setuptools (the dev extra's
# `build`).
dist: $(STAMP)
	$(PY) -m build --no-isolation --outdir dist .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
