# The two commands of the README: `make demo` and `make test`. Each creates or reuses
# .venv and installs what it needs. torch==2.13.0 goes first: a bare `torch`
# requirement on an empty environment pulls a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.fedpriv-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test test-fast lint venv clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "fedpriv needs Python >= 3.11 (flwr 1.42)"'
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fedpriv simulate $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The everyday loop: every test that starts no process (those are marked e2e).
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not e2e" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
