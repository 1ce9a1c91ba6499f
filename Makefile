# medlake: two set-up commands on a fresh machine with Python 3.11:
#   make demo   - create .venv if missing, install, fill the demo workspace, start the UI
#   make test   - create/update .venv, run the whole test suite
#   make lock   - refresh requirements.lock (what both install from) after a pyproject.toml change
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export STREAMLIT_BROWSER_GATHER_USAGE_STATS := false

.PHONY: demo test install lock lint clean-lake browser generated

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or make PYTHON=python3)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# the environment comes from requirements.lock (exact versions, sha256 of every file), then
# medlake itself without resolving anything again
$(STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --require-hashes -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Refresh requirements.lock from pyproject.toml (core + dev + scale), with hashes. Versions
# already in the lock are kept; to move one: make lock LOCK_FLAGS='--upgrade-package NAME'
# (or LOCK_FLAGS=--upgrade for all). Commit the lock with the pyproject.toml change.
LOCK_FLAGS ?=
lock: | $(BIN)/python
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra scale --generate-hashes \
	  --python-version 3.11 $(LOCK_FLAGS) -o requirements.lock

demo: $(STAMP)
	$(BIN)/medlake demo

# Debian's chromium for the browser tests and nginx for the reverse-proxy identity test
# (tests/test_ui_identity.py), when apt-get is there and they are missing.
browser:
	@if ! { command -v chromium && { command -v nginx || test -x /usr/sbin/nginx; }; } >/dev/null 2>&1 \
	  && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium nginx >/dev/null) \
	  || echo "could not install chromium/nginx; browser and proxy tests will skip (or fail under CI)"; \
	fi

test: $(STAMP) browser
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check medlake catalog pipelines ui demo tests bench

# regenerate what the stage declarations define: dvc.yaml and the tables in docs/ARCHITECTURE.md
generated: $(STAMP)
	$(BIN)/medlake pipeline
	$(BIN)/python -m medlake.pipelines.registry

clean-lake:
	rm -rf lake
