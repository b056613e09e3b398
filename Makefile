# make run   : set up .venv, fetch the embedded models, run the whole pipeline on config.yaml
# make test  : set up .venv if needed, run the test suite (what .ci/run calls)
# make test-interop : SAE folders against the real SAELens and llamascopium, in .venv-interop (.ci/run too)
# make test-hub     : the paper configuration's structure end to end on an offline hub fixture
# make test-cluster : the same through profiles/slurm on a local one-node SLURM cluster (root;
#                     scripts/slurm-cluster.sh install|up|down); see docs/cluster.md
# make report / gallery / times : the Snakemake report, the README gallery, per-stage times
# make mutate : mutation testing of the modules behind published numbers (not in CI; docs/testing.md);
#               MUTATE="claims spectrum" for some groups, MUTATE_ARGS="--timeout 600" for a time limit each

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= all
# Rules call the `attnspace` CLI: put the venv first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

CLUSTER_STAMP := $(VENV)/.installed-cluster

.PHONY: run test test-interop test-all test-hub test-cluster bench lint dry-run report gallery times mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test,hub]"
	touch $(STAMP)

$(CLUSTER_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[test,hub,cluster]"
	touch $(CLUSTER_STAMP)

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
	$(BIN)/python -m pytest -q -m "not hub and not cluster"

test-hub: $(STAMP)
	$(BIN)/python -m pytest -q -m hub tests/test_hub.py

# Brings the local cluster up, runs the test, and takes the cluster down again whatever the outcome.
# A base folder of its own: pytest prunes old folders under its shared temporary root, so a
# concurrent pytest run could delete this long run's folders.
test-cluster: $(CLUSTER_STAMP)
	scripts/slurm-cluster.sh up
	$(BIN)/python -m pytest -q -rA -m cluster --basetemp=/tmp/attnspace-test-cluster tests/test_cluster.py; rc=$$?; scripts/slurm-cluster.sh down; exit $$rc

MUTATE ?=
MUTATE_ARGS ?=
mutate: $(STAMP)
	$(BIN)/python scripts/mutate.py $(MUTATE_ARGS) $(MUTATE)

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
