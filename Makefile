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

.PHONY: demo test venv tools clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/flwr-guard demo $(DEMO_ARGS)

# System tools the tests run for real: promtool (Debian's `prometheus` package) checks
# the Prometheus configuration and rules. Installed only when missing and apt is there
# (as root, or with sudo without a password); otherwise those tests skip and say why.
tools:
	@if command -v promtool >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "installing promtool (apt package prometheus)"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    prometheus >/dev/null || echo "could not install prometheus; promtool tests will skip"; \
	else echo "no promtool and no apt-get; promtool tests will skip"; fi

test: $(STAMP) tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(TEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
