# Two commands for a newcomer: `make run` (the dashboard on the embedded model) and `make test`.
# Both build .venv from nothing; torch is pinned to the CPU build on this machine's disk.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlprune-installed
TORCH ?= torch==2.13.0

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

.PHONY: install run test lint bench
install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/streamlit run app.py

# The browser test needs Debian's chromium; install it when we may (root), else it is skipped.
test: $(STAMP)
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null); } || echo "chromium not installed: the browser test will be skipped"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Engine figures (bench/run.py), then the live-speed ones (bench/live.py); on a machine with a
# GPU, also run `$(PY) bench/gpu.py` (models of the real shapes built from configs).
bench: $(STAMP)
	$(PY) bench/run.py
	$(PY) bench/live.py
