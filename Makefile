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
	# weightwatcher's own xmin_peak and TPL routes need powerlaw 1.x; the dev extra pins 2.0.0,
	# so 1.5 goes beside the venv (no deps) and only the test's weightwatcher subprocess sees it
	$(BIN)/pip install -q --no-deps --target $(VENV)/powerlaw1 powerlaw==1.5
	touch $(STAMP)

install: $(STAMP)

# the suite CI runs: every test but the soak lane (the longest real-process proofs), on two
# pytest-xdist workers (one per core of CI's 2; --dist loadfile keeps a file's module fixtures
# in one worker). Measured from a fresh clone on the 2-core machine at load 2-3: 649 tests in
# 9.8-11 min (12.5-14 min with the install); docs/development.md has the lanes' figures
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not soak" tests

# everything, the soak lane included (about twice as long)
test-all: $(STAMP)
	$(BIN)/python -m pytest -q tests

# the edit loop: every test not marked slow (no spawned processes, no training beyond a few
# steps, no Chromium, Dask or Jupyter kernel, no whole HTML report); `make test` runs them all.
# 526 tests: 13 min on two workers at load 8-10 (6.4 min in one process at a lower load)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

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
