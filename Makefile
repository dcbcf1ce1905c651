# Two entry points: `make demo` and `make test`. Both bootstrap .venv first.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip
CONSTRAINTS := infra/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test install setup unit integration clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# torch first, pinned: anything that depends on torch must find it installed
	$(PIP) install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	# MovieLens-100k files only (recbole's own dependencies are not needed)
	$(PIP) install --quiet -c $(CONSTRAINTS) --no-deps recbole==1.2.1
	touch $(STAMP)

install: $(STAMP)

setup: $(STAMP)
	$(VENV)/bin/streamrec setup

demo: setup
	$(VENV)/bin/streamrec demo

test: setup
	bash infra/scripts/system-deps.sh
	$(VENV)/bin/python -m pytest -q -ra

unit: $(STAMP)
	$(VENV)/bin/python -m pytest -q tests/unit

integration: setup
	$(VENV)/bin/python -m pytest -q tests/integration

clean:
	rm -rf $(VENV) .streamrec .pytest_cache
