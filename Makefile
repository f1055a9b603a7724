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

.PHONY: demo test venv tools engine clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP) tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/flwr-guard demo $(DEMO_ARGS)

# System tools the tests and the demo run for real: promtool and the Prometheus server (Debian's
# `prometheus` package) check the configuration and rules and scrape a real run; the
# Pushgateway (`prometheus-pushgateway`) receives the pushes of short runs. Installed only
# when missing and apt is there (as root, or with sudo without a password); otherwise
# those tests skip and say why.
tools:
	@PKGS=""; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || PKGS="prometheus"; \
	command -v prometheus-pushgateway >/dev/null 2>&1 || PKGS="$$PKGS prometheus-pushgateway"; \
	if [ -z "$$PKGS" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "installing$$PKGS (apt)"; \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    $$PKGS >/dev/null || echo "could not install$$PKGS; the tests that need them will skip"; \
	else echo "no apt-get: the tests that need$$PKGS will skip"; fi

# What the compose cluster test (tests/test_deploy_compose_cluster.py) needs: a container
# engine that runs (Docker, else Debian's podman and runc, installed with apt-get like the
# tools above, configured by deploy/podman/containers.conf) and, when no image registry
# answers, the local base image (Debian bookworm with python3.11, bootstrapped with
# debootstrap: deploy/podman/base-image.sh, about 40 s once; the engine keeps it).
# Each part only when missing; never fails make (the test then fails and says why).
# FLWR_GUARD_SKIP_CLUSTER=1 switches the test and this step off.
engine:
	@PYTHON=$(PYTHON) bash deploy/podman/setup.sh

# Lint and type checks first (seconds), then the suite.
test: $(STAMP) tools engine
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest $(TEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
