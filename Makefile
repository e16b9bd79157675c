# pruneshot: `make run` sets everything up and runs the embedded default;
# `make test` sets everything up and runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
CORES ?= all

.PHONY: setup run test lint report bench clean-results

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# dvc repro runs `snakemake --cores all` (dvc.yaml) and records hashes in dvc.lock. It skips snakemake
# when the study is up to date, so the summary is printed here, not by the workflow's onsuccess handler.
run: setup
	PRUNESHOT_NO_SUMMARY=1 dvc repro pipeline
	pruneshot summary

# Debian packages the suite needs beyond the venv, installed when missing (sudo when not root):
# chromium (tests/test_report_browser.py) and a single-node Slurm cluster (tests/test_slurm.py).
.PHONY: test-deps
test-deps:
	bash .ci/install-test-deps.sh

# tests/test_slurm.py mostly waits on a real Slurm cluster's scheduling: it runs alongside the rest
# of the suite (own pytest session and temp dir, output shown afterwards); both must pass.
test: setup test-deps
	@log=$$(mktemp); \
	python -m pytest tests/test_slurm.py --basetemp=$$(mktemp -d) >"$$log" 2>&1 & slurm=$$!; \
	python -m pytest --ignore=tests/test_slurm.py; rest=$$?; \
	wait $$slurm; s=$$?; echo "--- tests/test_slurm.py (ran alongside) ---"; cat "$$log"; rm -f "$$log"; \
	[ $$rest -eq 0 ] && [ $$s -eq 0 ]

lint: setup
	ruff check .
	snakemake --lint
	python -m pruneshot.methods.schema --check

# Regenerate tables and report from existing (e.g. `dvc pull`ed) artefacts, no training.
report: setup
	snakemake --cores 1 --touch
	snakemake --cores 1 --forcerun aggregate report   # its onsuccess handler prints the summary

bench: setup
	python benchmarks/pipeline.py

clean-results:
	rm -rf results logs .snakemake
