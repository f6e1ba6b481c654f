# Florence-2 on OpenVINO — build, run and test the notebook collection.
#
#   make run    run every lesson headless, in order; executed copies (.ipynb + .html) go to output/
#   make test   ruff (lint + format check), the import contracts (lint-imports), then pytest over tests/ plus every
#               notebook with nbval (offline, on a tiny model)
#   make lab    open the lessons in JupyterLab
#   make clean  remove outputs and build files (keeps .venv and the converted models in models/)
#
# Every target sets up .venv on first use (and again when requirements.txt or pyproject.toml change).

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Linux users who want CPU-only PyTorch (about 200 MB instead of several GB of CUDA packages):
#   make run TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Empty (the default): torch comes from your normal index, at the version pinned in requirements.txt.
TORCH_INDEX_URL ?=
TORCH_PIN := $(shell sed -n 's/^torch==\([^ ;#]*\).*/\1/p' requirements.txt)

# Extra arguments for scripts/run_collection.py, e.g. `make run RUN_ARGS="04_captioning 05_detection"`.
RUN_ARGS ?=

# nbval only runs when there are notebooks: a missing or empty notebooks/ must not stop tests/ from running.
NOTEBOOKS := $(sort $(wildcard notebooks/*.ipynb))
NBVAL_ARGS := $(if $(NOTEBOOKS),--nbval-lax --nbval-current-env --nbval-cell-timeout=600 notebooks/)

# Jupyter refuses to start as root unless told to (containers, CI machines).
LAB_ARGS := $(if $(filter 0,$(shell id -u)),--allow-root)

.DEFAULT_GOAL := help
.PHONY: help run test lint lab clean distclean venv screenshot

help:
	@echo "make run        run every notebook in notebooks/ headless; executed copies go to output/"
	@echo "make test       lint (ruff, import contracts), then offline tests: pytest tests/ + every notebook with nbval"
	@echo "make lint       only ruff check, ruff format --check and lint-imports (seconds)"
	@echo "make lab        open the lessons in JupyterLab"
	@echo "make screenshot re-take docs/demo.png with the browser test (needs chromium)"
	@echo "make clean      remove output/, build/ and caches (keeps .venv and models/)"
	@echo "make distclean  clean, and also remove .venv and models/"

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@echo "$(PYTHON) -m venv $(VENV)"
	@if ! $(PYTHON) -m venv $(VENV); then \
	  rm -rf $(VENV); \
	  echo "error: '$(PYTHON) -m venv' failed. Install Python's venv module (Debian/Ubuntu: apt-get install python3-venv)," >&2; \
	  echo "       or point the Makefile at another interpreter: make PYTHON=python3.11 ..." >&2; \
	  exit 1; \
	fi
	$(VPY) -m pip install --upgrade pip
	$(if $(TORCH_INDEX_URL),$(VPY) -m pip install "torch==$(TORCH_PIN)" --index-url $(TORCH_INDEX_URL))
	$(VPY) -m pip install -r requirements.txt
	$(VPY) -m pip install --no-deps -e .
	touch $@

run: $(STAMP)
	$(VPY) scripts/run_collection.py $(RUN_ARGS)

# The shape of helpers/ (docs/CONTRIBUTING.md): ruff's rules and format, and the layer contracts in pyproject.toml.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# Exit code 5 is pytest's "no tests were collected": turn it into a loud failure instead of a quiet pass.
test: lint
	@echo "HF_HUB_OFFLINE=1 $(VPY) -m pytest -p no:cacheprovider tests/ $(NBVAL_ARGS)"
	@HF_HUB_OFFLINE=1 $(VPY) -m pytest -p no:cacheprovider tests/ $(NBVAL_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests at all -- failing on purpose." >&2; exit 1; fi; \
	exit $$status

lab: $(STAMP)
	$(VENV)/bin/jupyter lab $(LAB_ARGS) notebooks/

# The README's picture of the demo: the browser test copies its screenshot to docs/demo.png.
screenshot: $(STAMP)
	UPDATE_SCREENSHOT=1 HF_HUB_OFFLINE=1 $(VPY) -m pytest -p no:cacheprovider tests/test_browser_demo.py

clean:
	rm -rf output/ build/ .pytest_cache/ .hypothesis/
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) models/ notebooks/models/
