# Two entry points for a fresh machine: `make demo` and `make test`. Everything is installed into
# .venv through constraints.txt, which pins torch to the local CPU build (an unpinned torch would
# pull gigabytes of CUDA wheels) and keeps the broken torchvision out.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test test-slow test-vision bench lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[tensorboard]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/probssl demo --out runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m slow

# timm and torchvision cannot import beside the pinned CPU torch, so their tests (`-m vision`: timm
# backbones, torchvision / timm weights against the project's own ResNets and ViTs) get a second
# environment with the torch whose CUDA build lies on the local disk (6 GB, ~1.5 min idle; it runs on the CPU).
VISION_VENV ?= .venv-vision
$(VISION_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 timm
	$(VISION_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,timm]'
	touch $@

test-vision: $(VISION_VENV)/.installed
	$(VISION_VENV)/bin/python -m pytest -m vision

# The benchmark command: slow end-to-end tests, then the digits suite (every method, 3 seeds) and the
# speed table, both written into BENCHMARKS.md. Fashion-MNIST (14 arms x 3 seeds, ~12 core-hours at one thread per run
# in stops 18-20: 9.5 h of training, 2.6 h of evaluation wall):
# `probssl bench fashion_mnist --data-dir DIR --jobs 2 --update BENCHMARKS.md`.
bench: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -m slow
	$(BIN)/probssl bench digits --out runs/bench --update BENCHMARKS.md --no-progress
	$(BIN)/probssl bench speed --config fashion_mnist --out runs/bench --update BENCHMARKS.md --no-progress

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) $(VISION_VENV) runs build *.egg-info src/*.egg-info
