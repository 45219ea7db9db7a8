PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install test test-all test-fast lint demo bench clean docs study-mini

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (pinned: a local CPU wheel here; never an open range), then the package.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# the suite CI runs: every test but the soak lane (the longest real-process proofs)
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not soak" tests

# everything, the soak lane included (about twice as long)
test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the edit loop: every test not marked slow (no spawned processes, no training beyond a few
# steps, no Chromium, Dask or Jupyter kernel, no whole HTML report); `make test` runs them all
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check dynlab cli tests bench

demo: $(STAMP)
	$(BIN)/python -m dynlab.demo

# the study's grid at CPU scale (configs/study/mini.yaml: nano and micro decoder and relora × 5 seeds) on
# 2 processes, then its claims table and report; rerun to resume after an interruption
study-mini: $(STAMP)
	$(BIN)/dynlab study run configs/study/mini.yaml --out study_mini --jobs 2 --no-progress
	$(BIN)/dynlab study report study_mini --html study_mini/report.html

bench: $(STAMP)
	$(BIN)/python bench/analyze_bench.py

clean:
	rm -rf $(VENV) demo_out study_mini .pytest_cache

# the documentation site into site/ (broken links and missing references fail the build)
docs: $(STAMP)
	$(BIN)/mkdocs build --strict
