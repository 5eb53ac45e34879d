# Rankwise — the two commands that matter:
#   make demo   set up everything and run the app with its demo
#   make test   run the whole test suite
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DEMO_HOST ?= 127.0.0.1
DEMO_PORT ?= 8000

.PHONY: help demo test loop lint format migrate clean vendor

help:
	@echo "make demo    virtualenv, dependencies, migrations, demo users, Redis if needed, workers, web server"
	@echo "make test    the whole test suite (PostgreSQL and Redis on 127.0.0.1)"
	@echo "make loop    the whole loop on the demo task with simulated people, and its report"
	@echo "make lint    ruff lint and format check"
	@echo "make format  ruff format and autofix"
	@echo "make vendor  the pinned browser libraries (npm ci) copied into static/vendor/"

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Rankwise needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Stamps record which requirement files are installed; they are redone when a file changes.
$(VENV)/.runtime-installed: requirements.txt | $(VENV)/bin/python
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev-installed: requirements.txt requirements-dev.txt | $(VENV)/bin/python
	$(PIP) install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime-installed $@

# Browser libraries come from the npm registry at the versions package-lock.json
# pins (integrity-checked by npm ci) and are copied into static/vendor/, which
# git ignores: nothing is pasted by hand and no page loads a script from a CDN.
VENDOR_STAMP := static/vendor/.installed
$(VENDOR_STAMP): package.json package-lock.json
	npm ci --ignore-scripts --no-audit --no-fund
	rm -rf static/vendor
	mkdir -p static/vendor/chart.js
	cp node_modules/chart.js/dist/chart.umd.js node_modules/chart.js/dist/chart.umd.js.map \
	   node_modules/chart.js/LICENSE.md static/vendor/chart.js/
	touch $@

vendor: $(VENDOR_STAMP)

# Serves at once; the demo model builds in the background (progress at /demo-model/),
# and the address and the accounts' new passwords are printed last (rundemo --demo).
demo: export DEBUG = 1
demo: $(VENV)/.runtime-installed $(VENDOR_STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py demo_users --quiet-passwords
	$(PY) manage.py seed_demo
	HF_HUB_OFFLINE=1 $(PY) manage.py rundemo --demo --host $(DEMO_HOST) --port $(DEMO_PORT)

# The whole loop with simulated labelers and evaluators (see README, "The whole loop").
loop: export DEBUG = 1
loop: $(VENV)/.runtime-installed
	$(PY) manage.py migrate --noinput
	HF_HUB_OFFLINE=1 $(PY) manage.py simulate_loop $(LOOP_ARGS)

test: $(VENV)/.dev-installed $(VENDOR_STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache .hypothesis node_modules static/vendor
