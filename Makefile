# The two commands: `make serve` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned in pyproject.toml; pip takes the CPU build from this machine's disk
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/quanta serve

test: $(STAMP)
	$(BIN)/ruff check quanta tests
	$(BIN)/ruff format --check quanta tests
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m quanta.bench serve

clean:
	rm -rf $(VENV) build *.egg-info
