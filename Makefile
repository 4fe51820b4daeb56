# The project's commands. They work on a fresh machine: each main target first runs
# scripts/setup.sh, which creates ./.venv and installs the locked versions of constraints.txt (about a
# second when that is done).
#
#   make book     execute the chapters at the `ci` budget on the offline default model and build
#                 the site into _build/html (incremental; `make book CLEAN=1` starts from an empty _build)
#   make test     the full test suite: unit tests (the `gemma` ones included), actionlint over the
#                 GitHub workflows, the book build (chapters executed by papermill), nbval over the
#                 executed chapters, every chapter executed on a tiny model of each family (masked,
#                 seq2seq, causal), the exercises, the grading exports through nbgrader and
#                 otter-grader, a Colab-like venv running chapter 1 from its own install cell, the
#                 the library core's unit tests at the declared lower bounds, pip resolutions for every Python version
#                 claimed, and the site tests in headless Chromium.
#                 CI runs exactly this (.ci/run).
#   make bench    python -m course_lib bench   (BENCH_ARGS="..." for its options)
#   make clean    remove _build/ and test caches (keeps .venv, node_modules, results/, runs/)
#   make distclean   clean, and remove .venv and node_modules too
#
# Pieces, for use after `make setup`: test-unit, test-workflows, book-build, test-notebooks,
# test-families, test-exercises, test-grading, test-colab, test-lower-bounds, test-pythons, test-site.
#   make exercises   regenerate exercises/ and solutions/ from exercises/source/
#   make exercise-times   measure book/exercise_times.csv (minutes per exercise), after book-build
#   make release TAG=vX.Y.Z [URL=...]   set the release students install, in every copy (scripts/set_release.py)
#   make lock        re-resolve constraints.txt, keeping locked versions (scripts/lock.py; UPGRADE="pkg ...")
#
# Variables (make VAR=value, or the environment):
#   BOOK_BUDGET     budget the chapters run at (default ci; gpu for the full runs)
#   CLEAN           1: build the book from an empty _build/ (default 0: re-use jupyter-cache)
#   HF_HUB_OFFLINE  default 1 for the book build: chapters use the models packaged on PyPI
#   PYTEST_ARGS     extra arguments for the unit-test run
#   TORCH_LOWER     torch for test-lower-bounds (default 2.13.0, on disk; 2.10.0 is the real bound, ~4 GB)
# COURSE_LIB_DATA defaults to ../shared/data when that folder exists (scripts/env.sh).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Prerequisites run one after the other, in the order listed, even under `make -j`.
.NOTPARALLEL:

VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
# Every recipe uses the project's venv (scripts/build_book.sh and jupyter-book included).
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)

BOOK_BUDGET ?= ci
CLEAN ?= 0
HF_HUB_OFFLINE ?= 1
PYTEST_ARGS ?=
BENCH_ARGS ?=
TORCH_LOWER ?= 2.13.0
UPGRADE ?=

# Source the environment defaults (COURSE_LIB_DATA) in the recipe line's shell.
ENV := . scripts/env.sh;
# A timestamped banner for each phase (no commas or quotes in the text).
phase = @echo "==> [$$(date '+%Y-%m-%d %H:%M:%S')] $(1)"

.PHONY: help setup setup-book setup-test book book-build test test-unit test-notebooks test-families test-exercises \
        exercises exercise-times test-site test-workflows test-grading test-colab test-lower-bounds test-pythons release \
        lock bench clean distclean

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

# ---------------------------------------------------------------------------------------------
# Setup (scripts/setup.sh is idempotent and fast when nothing changed)
# ---------------------------------------------------------------------------------------------
setup:
	$(call phase,setup: Python venv + node + browser)
	bash scripts/setup.sh all

setup-book:
	$(call phase,setup: Python venv + node)
	bash scripts/setup.sh book

setup-test:
	$(call phase,setup: Python venv + node + browser)
	bash scripts/setup.sh test

# ---------------------------------------------------------------------------------------------
# The book
# ---------------------------------------------------------------------------------------------
book: setup-book book-build
	@echo
	@echo "The book is built. Open it in a browser:"
	@echo "    file://$(CURDIR)/_build/html/index.html"
	@echo "or serve it (then open http://localhost:8000):"
	@echo "    $(PY) -m http.server --directory _build/html 8000"

book-build:
	$(call phase,book: execute the chapters at budget $(BOOK_BUDGET) and build the site)
	$(ENV) BOOK_BUDGET='$(BOOK_BUDGET)' CLEAN='$(CLEAN)' HF_HUB_OFFLINE='$(HF_HUB_OFFLINE)' \
	  bash scripts/build_book.sh

# ---------------------------------------------------------------------------------------------
# Tests. Every pytest run here fails the target on any non-zero exit, 5 (no tests collected)
# included: never wrap these in `|| true` or turn exit 5 into success.
# ---------------------------------------------------------------------------------------------
test: setup-test test-unit test-workflows book-build test-notebooks test-families test-exercises test-grading \
      test-colab test-lower-bounds test-pythons test-site
	$(call phase,make test: all phases passed)

test-unit:
	$(call phase,unit tests: pytest -m not-site over tests/ incl. the gemma marker)
	$(ENV) $(PY) -m pytest -q -m "not site and not notebooks and not grading" $(PYTEST_ARGS)

# actionlint (from the lock) checks every workflow: syntax, expressions, the inputs of each action at
# the version used, retired action versions, and the run: scripts with shellcheck (Debian's).
test-workflows:
	$(call phase,workflows: actionlint over .github/workflows)
	$(VENV)/bin/actionlint -version | head -n1
	$(VENV)/bin/actionlint -verbose .github/workflows/*.yml

# nbgrader and otter-grader on the exports: every chapter generated; one graded twice by each tool.
test-grading:
	$(call phase,grading: the exports through nbgrader and otter-grader)
	$(ENV) $(PY) -m pytest -q -m grading tests/test_grading_tools.py

# A fresh venv with Colab's versions; chapter 1 and its worked exercises from their own install cell.
test-colab:
	$(call phase,Colab-like venv: chapter 1 and its exercises installed by their own first cell)
	$(ENV) bash scripts/colab_check.sh

test-lower-bounds:
	$(call phase,unit tests of the library core at the declared lower bounds (torch $(TORCH_LOWER)))
	TORCH_LOWER='$(TORCH_LOWER)' bash scripts/lower_bounds.sh

test-pythons:
	$(call phase,pip resolutions for every Python version README claims)
	bash scripts/check_pythons.sh

# nbval re-executes every executed chapter and compares the outputs of the cells tagged
# `nbval-check-output` (rounded key numbers) with those of the papermill run. Results cached by
# the first run make most chapters cheap to re-run; chapter 3 is re-run from an empty results
# cache, so its soft-prompt training really happens twice and must give the same numbers.
NBVAL := $(PY) -m pytest -q -p no:cacheprovider --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg
COLD_CHAPTER := _build/executed/book/03_soft_prompts.ipynb
test-notebooks:
	$(call phase,nbval: re-execute the executed chapters and compare their tagged outputs)
	$(ENV) shopt -s nullglob; warm=(); for nb in _build/executed/book/*.ipynb; do \
	  [[ "$$nb" == "$(COLD_CHAPTER)" ]] || warm+=("$$nb"); done; \
	  (( $${#warm[@]} )) || { echo "no executed chapters under _build/executed/book: run make book-build first"; exit 1; }; \
	  $(NBVAL) "$${warm[@]}"
	$(call phase,reproducibility: chapter 3 re-executed from an empty results cache)
	$(ENV) test -f $(COLD_CHAPTER) || { echo "missing $(COLD_CHAPTER)"; exit 1; }; \
	  cold=$$(mktemp -d); trap 'rm -rf "$$cold"' EXIT; COURSE_LIB_RESULTS_CACHE=$$cold $(NBVAL) $(COLD_CHAPTER)

# Every chapter on a tiny random model of each family: a student's switch of MODEL to bert-base-cased,
# facebook/bart-base or a causal LM is a tested path (scripts/test_families.sh).
test-families:
	$(call phase,families: every chapter on tiny-bert / tiny-bart / tiny-gpt2 at budget $(BOOK_BUDGET))
	$(ENV) BOOK_BUDGET='$(BOOK_BUDGET)' HF_HUB_OFFLINE='$(HF_HUB_OFFLINE)' bash scripts/test_families.sh

# After the book build, so that the experiments the exercises share with the chapters are cached.
test-exercises:
	$(call phase,exercises: sources in sync; solutions pass every check; exercises fail every check)
	$(ENV) $(PY) -m course_lib.exercises --check
	$(ENV) $(PY) -m pytest -q -m notebooks tests/test_exercises.py

exercises:
	$(call phase,regenerate exercises/ and solutions/ from exercises/source/)
	$(ENV) $(PY) -m course_lib.exercises

# The minutes per exercise that book/instructors.md shows: each worked notebook's first run after
# the chapters (scripts/exercise_times.sh); needs the chapters executed (book-build) first.
exercise-times:
	$(call phase,minutes per exercise: worked notebooks run afresh into book/exercise_times.csv)
	$(ENV) bash scripts/exercise_times.sh

release:
	$(call phase,set the release in _config.yml and write it into every copy)
	$(PY) scripts/set_release.py $(if $(TAG),--tag $(TAG)) $(if $(URL),--url $(URL))

lock:
	$(call phase,re-resolve constraints.txt (the lock) and environment.yml)
	$(PY) scripts/lock.py $(if $(UPGRADE),--upgrade $(UPGRADE))

test-site:
	$(call phase,site tests: the built book in headless Chromium)
	$(ENV) $(PY) -m pytest tests/site -q

# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------
bench: setup-book
	$(call phase,bench: python -m course_lib bench $(BENCH_ARGS))
	$(ENV) $(PY) -m course_lib bench $(BENCH_ARGS)

# ---------------------------------------------------------------------------------------------
# Cleaning
# ---------------------------------------------------------------------------------------------
clean:
	rm -rf _build .pytest_cache .hypothesis course_lib.egg-info
	find . \( -path ./.venv -o -path ./node_modules -o -path ./.git \) -prune -o \
	  -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv .venv-colab .venv-lower node_modules
