# napari-medseg: `make demo` and `make test` do the whole set-up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEB_PACKAGES := xvfb xauth libxcb-icccm4 libxcb-keysyms1 libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libdbus-1-3 libfontconfig1
XVFB := xvfb-run -a -s "-screen 0 1280x1024x24"
PYTEST_ARGS ?=

.PHONY: all setup system venv test demo bench lint clean

all: test

setup: system venv

# Debian packages for napari under a virtual screen, installed only when missing.
system:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(STAMP)

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q --disable-pip-version-check -e ".[gui,slides,distributed,test]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, medseg, napari_medseg" 
	touch $(STAMP)

test: setup
	$(BIN)/lint-imports
	$(BIN)/npe2 validate napari_medseg/napari.yaml
	NAPARI_CONFIG=$$(mktemp -d)/napari.yaml $(XVFB) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ]; then \
	  $(BIN)/python -m napari_medseg.demo; \
	else \
	  $(BIN)/python -m medseg.demo demo_output; \
	fi

bench: setup
	$(BIN)/python benchmarks/predictor.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
