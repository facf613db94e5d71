# sdtune: `make demo` trains the quickstart LoRA, `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

RAW ?=
OUT ?= data/clean
MODEL ?= sd15
RECIPE ?=
NP ?= 2
CAPTION ?=
CAPTION_MODE ?=
CAPTION_PROMPT ?=
TRIGGER ?=

.PHONY: install lock test-latest demo data bench bench-gpu bench-startup test test-slow test-gpu test-all lint clean

# The install is the lock: every package at the exact version CI tested (requirements.lock, made
# by `make lock` from pyproject.toml's ranges and the dev extra). torch is the local CPU wheel
# (torch==2.13.0+cpu); an unpinned torch would pull several GB of CUDA packages.
$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "requirements.lock is compiled for Python 3.11, the version CI runs, and $(PYTHON) is %d.%d. Fix: make PYTHON=python3.11 ..., or on another Python install from the ranges: pip install -e .[dev]" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m sdtune experiment=quickstart

# Clean a raw image+caption folder with a data-juicer recipe into a training-ready folder.
# MODEL picks the shipped recipe for that family's size (data_pipeline/recipes/<MODEL>.yaml);
# RECIPE=<file> uses your own. CAPTION=<model folder or Hub id> captions the kept images (BLIP,
# a chat VLM, or a WD14 tagger) as the recipe's last op: CAPTION_MODE=missing|replace|prefix,
# CAPTION_PROMPT=..., TRIGGER=<word>. Every value is single-quoted for the shell (paths with
# spaces, quotes, $ or ;).
shq = '$(subst ','\'',$(1))'
data: $(STAMP)
	@test -n $(call shq,$(RAW)) || { echo "usage: make data RAW=<raw image folder> [OUT=data/clean] [MODEL=sd15|sdxl|kolors] [RECIPE=<recipe.yaml>] [NP=2] [CAPTION=<model> [CAPTION_MODE=missing|replace|prefix] [CAPTION_PROMPT=<text>] [TRIGGER=<word>]]"; exit 2; }
	$(PY) -m data_pipeline $(call shq,$(RAW)) $(call shq,$(OUT)) --model $(call shq,$(MODEL)) $(if $(RECIPE),--recipe $(call shq,$(RECIPE))) --np $(NP) $(if $(CAPTION),--caption $(call shq,$(CAPTION))) $(if $(CAPTION_MODE),--caption-mode $(call shq,$(CAPTION_MODE))) $(if $(CAPTION_PROMPT),--caption-prompt $(call shq,$(CAPTION_PROMPT))) $(if $(TRIGGER),--trigger $(call shq,$(TRIGGER)))

# Speed and memory of the real training step against a plain PyTorch loop (tiny models on the CPU).
bench: $(STAMP)
	$(PY) -m sdtune.bench

# On a GPU machine: the three GPU targets (full-size SD1.5, SDXL, Kolors, random weights) one after
# another, each writing its rows into docs/benchmarks.md ("GPU rows", between marker comments).
# A failed preset does not stop the others; the target fails at the end if any did.
bench-gpu: $(STAMP)
	status=0; for preset in gpu_sd15 gpu_sdxl gpu_kolors gpu_flux gpu_sd35; do \
		$(PY) -m sdtune.bench bench/preset=$$preset bench.write_docs=true || status=1; \
	done; exit $$status

# CPU seconds from the command to one finished step: sdtune against a plain diffusers-style script.
bench-startup: $(STAMP)
	$(PY) -m sdtune.bench.startup --runs 5

# `make test` (about 2.5 minutes on 2 cores) leaves out the tests marked slow;
# `make test-slow` runs the long end-to-end runs; CI runs both (.ci/run). Neither runs the tests
# marked gpu: `make test-gpu` runs those on a CUDA machine (they skip, with the reason, without one).
# Both run two pytest-xdist workers, each test file on one of them (its fixtures shared within the file):
# most tests are one process's start-up and small tensors, which leave the second core idle.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" -n 2 --dist loadfile

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu" -n 2 --dist loadfile

# bitsandbytes (model.quantize=nf4, optim=adamw8bit) is CUDA-only and not in the lock's default install.
BNB_PIN = bitsandbytes==0.50.2
test-gpu: $(STAMP)
	$(PY) -m pip install -q "$(BNB_PIN)"
	$(PY) -m pytest -q -m gpu

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check sdtune data_pipeline tests

# Regenerate requirements.lock from pyproject.toml's ranges.
# Upgrading is on purpose: `make lock`, `make test`, read `git diff requirements.lock`, commit both.
UV := $(VENV)-tools/bin/uv
$(UV):
	$(PYTHON) -m venv $(VENV)-tools
	$(VENV)-tools/bin/pip install -q "uv>=0.9,<1"
# The current lock is uv's starting point (its pins are kept unless a changed range needs another version);
# `make lock UPGRADE=1` starts from nothing and takes the newest versions the ranges admit.
lock: $(UV)
	$(if $(UPGRADE),rm -f requirements.lock.tmp,sed 1d requirements.lock > requirements.lock.tmp)
	$(UV) pip compile pyproject.toml --extra dev --find-links /opt/wheels --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header --annotation-style line -o requirements.lock.tmp
	{ echo "# The exact set CI tests. Regenerate with 'make lock' (uv pip compile pyproject.toml --extra dev)."; \
	  cat requirements.lock.tmp; } > requirements.lock.new && rm requirements.lock.tmp && mv requirements.lock.new requirements.lock

# The newest versions pyproject.toml's ranges admit, in a venv of their own (.venv-latest), against
# the fast suite: what `make lock` would bring in, tested before it is committed.
LATEST := $(VENV)-latest
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q torch==2.13.0
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -c <(echo torch==2.13.0) -e ".[dev]"
	$(LATEST)/bin/pip freeze --all --exclude-editable > $(LATEST)/freeze.txt
	@echo "versions that differ from requirements.lock (lock < > latest):"; \
	  norm() { grep -o '^[^ #]*==[^ ;]*' | awk -F'==' '{n=tolower($$1); gsub(/[-_.]+/,"-",n); print n"=="$$2}' | sort; }; \
	  diff <(norm < requirements.lock) <(norm < $(LATEST)/freeze.txt) | grep '^[<>]' || echo "  (none)"
	$(LATEST)/bin/python -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

clean:
	rm -rf outputs .cache .pytest_cache
