# sdtune: `make demo` trains the quickstart LoRA, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

RAW ?=
OUT ?= data/clean
MODEL ?= sd15
RECIPE ?=
NP ?= 2

.PHONY: install demo data bench bench-gpu bench-startup test test-slow test-gpu test-all lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: on CPU machines this is the local CPU wheel; an unpinned torch
	# would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sdtune experiment=quickstart

# Clean a raw image+caption folder with a data-juicer recipe into a training-ready folder.
# MODEL picks the shipped recipe for that family's size (data_pipeline/recipes/<MODEL>.yaml);
# RECIPE=<file> uses your own. RAW, OUT and RECIPE are single-quoted for the shell (paths with
# spaces, quotes, $ or ;).
shq = '$(subst ','\'',$(1))'
data: $(STAMP)
	@test -n $(call shq,$(RAW)) || { echo "usage: make data RAW=<raw image folder> [OUT=data/clean] [MODEL=sd15|sdxl|kolors] [RECIPE=<recipe.yaml>] [NP=2]"; exit 2; }
	$(PY) -m data_pipeline $(call shq,$(RAW)) $(call shq,$(OUT)) --model $(call shq,$(MODEL)) $(if $(RECIPE),--recipe $(call shq,$(RECIPE))) --np $(NP)

# Speed and memory of the real training step against a plain PyTorch loop (tiny models on the CPU).
bench: $(STAMP)
	$(PY) -m sdtune.bench

# On a GPU machine: the three GPU targets (full-size SD1.5, SDXL, Kolors, random weights) one after
# another, each writing its rows into docs/benchmarks.md ("GPU rows", between marker comments).
# A failed preset does not stop the others; the target fails at the end if any did.
bench-gpu: $(STAMP)
	status=0; for preset in gpu_sd15 gpu_sdxl gpu_kolors; do \
		$(PY) -m sdtune.bench bench/preset=$$preset bench.write_docs=true || status=1; \
	done; exit $$status

# CPU seconds from the command to one finished step: sdtune against a plain diffusers-style script.
bench-startup: $(STAMP)
	$(PY) -m sdtune.bench.startup --runs 5

# `make test` (under 10 minutes on 2 cores) leaves out the tests marked slow;
# `make test-slow` runs the long end-to-end runs; CI runs both (.ci/run). Neither runs the tests
# marked gpu: `make test-gpu` runs those on a CUDA machine (they skip, with the reason, without one).
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu"

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check sdtune data_pipeline tests

clean:
	rm -rf outputs .cache .pytest_cache
