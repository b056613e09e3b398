# make run   : set up .venv, fetch the embedded models, run the whole pipeline on config.yaml
# make test  : set up .venv if needed, run the test suite (what .ci/run calls)
# make test-interop : SAE folders against the real SAELens and llamascopium, in .venv-interop (.ci/run too)
# make report / gallery / times : the Snakemake report, the README gallery, per-stage times

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all
# Rules call the `attnspace` CLI: put the venv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test test-interop test-all bench lint dry-run report gallery times clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --workflow-profile profiles/default
	@echo
	@echo "Figures:  $$(ls results/figures/*.pdf | tr '\n' ' ')"
	@echo "Tables:   $$(ls results/tables/*.csv | tr '\n' ' ')"
	@echo "Claims:   results/claims.md (the verdict); report: make report"
	@echo "Per-stage times: results/benchmarks/; logs: results/logs/"

test: $(STAMP)
	$(BIN)/python -m pytest -q

# SAELens and llamascopium pull in transformer-lens, wandb and others: a venv of their own.
INTEROP := .venv-interop
$(INTEROP)/.installed: pyproject.toml
	$(PYTHON) -m venv $(INTEROP)
	$(INTEROP)/bin/pip install --quiet --upgrade pip
	$(INTEROP)/bin/pip install --quiet torch==2.13.0
	$(INTEROP)/bin/pip install --quiet -e ".[test,interop]"
	touch $@

test-interop: $(INTEROP)/.installed
	ATTNSPACE_INTEROP=1 $(INTEROP)/bin/python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning tests/interop

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

bench: $(STAMP)
	$(BIN)/python bench/cache_throughput.py
	$(BIN)/python bench/spectrum_throughput.py

lint: $(STAMP)
	$(BIN)/snakemake --lint

dry-run: $(STAMP)
	$(BIN)/snakemake -n --configfile config/paper.yaml

report: $(STAMP)
	$(BIN)/snakemake --report results/report.zip

# Small PNGs and the claims table under docs/gallery/, and the README's generated blocks
gallery: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --workflow-profile profiles/default gallery

# Per-stage times of the last run (from results/benchmarks/), as the README records them
times: $(STAMP)
	$(BIN)/attnspace stage-times results/benchmarks

clean:
	rm -rf results .snakemake
