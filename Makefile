# Every target sets up what it needs: a fresh clone runs `make test` or `make demo` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is a CPU build that the machines here install from a local file; pinning it
# keeps pip from resolving an unpinned `torch` to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test lint demo data bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
