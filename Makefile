# Tessera build and ops targets. Everything runs from ./.venv; nothing is installed globally.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Extra flags for `make run` / `make bench` (e.g. ARGS="--port 9000") and for pytest.
ARGS        ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := install

.PHONY: install run test lint fmt bench clean distclean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the project metadata changes. The top-level package __init__.py files
# are listed too: the editable install only maps the packages that existed when it ran.
$(STAMP): pyproject.toml $(wildcard protocol/__init__.py server/__init__.py client/__init__.py) | $(BIN)/python
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/tessera-server serve $(ARGS)

# pytest exits 5 when it collects nothing; CI must never pass on an empty run.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

# Keeps ./tessera-data (the embedded database and local blob store); see distclean.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -path ./.git -prune -o -path ./tessera-data -prune -o \
		-type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf ./tessera-data
