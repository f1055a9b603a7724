# The two commands of the README: `make demo` (the main job) and `make test`.
# Both create .venv with the pinned dependencies when it is missing or older than
# pyproject.toml, then run.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Install the CPU build of torch 2.13.0 first: a wheel of it is on this kind of machine
# (pip's find-links), and with it installed pip keeps it instead of pulling a CUDA build.
TORCH  ?= torch==2.13.0

DEMO_ARGS ?=
TEST_ARGS ?=

.PHONY: demo test venv clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/flwr-guard demo $(DEMO_ARGS)

test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(TEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
