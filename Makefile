# Set-up and checks. `make demo` and `make test` create .venv and do everything on a fresh machine.
# A torch already installed for this Python is reused; otherwise the CPU wheel torch==2.13.0 is installed,
# never a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ownership demo

test: $(STAMP)
	$(PY) -m ruff check ownership tests bench
	$(PY) -m ruff format --check ownership tests bench
	$(PY) -m mypy
	$(PY) -m pytest -p no:cacheprovider

lint: $(STAMP)
	$(PY) -m ruff check ownership tests bench
	$(PY) -m ruff format --check ownership tests bench

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/decide.py

clean:
	rm -rf $(VENV) build *.egg-info
