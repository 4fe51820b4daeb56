#!/usr/bin/env bash
# `make test-lower-bounds`: the unit tests once with every requirement at its declared lower bound.
#
# pyproject.toml declares ranges (`name>=X`) so that a user's environment, Colab's above all, is
# kept wherever it is in range. Each X must be a version the tests have passed on: this builds
# .venv-lower with course_lib[notebook,test] and every one of those requirements at exactly X
# (their own dependencies as pip resolves them), checks that pip installed exactly that, and runs
# the unit tests there (not the real-Gemma, notebook, site and grading ones, which have their own
# phases, nor tests/test_versions.py, which checks the lock).
#
#   TORCH_LOWER=2.13.0 (default)  torch's lower bound is 2.10.0 (Colab's). Any torch but 2.13.0 (a
#       CPU wheel on this machine's disk) or 2.14.1 means gigabytes of CUDA downloads per run, so CI
#       runs these tests with 2.13.0; `make test-lower-bounds TORCH_LOWER=2.10.0` runs the real bound
#       (about 4 GB from PyPI; done by hand, see README.md).
#   PYTEST_ARGS   passed on to pytest.
# A venv whose stamp matches the bounds is reused (FORCE=1 rebuilds it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-lower"
TORCH_LOWER="${TORCH_LOWER:-2.13.0}"
say() { echo "[lower-bounds] $*"; }
t0=$(date +%s)

constraints="$("$PYTHON" - "$TORCH_LOWER" <<'PY'
import re, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
reqs = project["dependencies"] + extras["notebook"] + extras["test"]
for r in reqs:
    name, low = re.match(r"^([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)", r).groups()
    print(f"{name}=={sys.argv[1] if name == 'torch' else low}")
PY
)"
stamp="$VENV/.lower-bounds-$(printf '%s\n' "$constraints" | sha256sum | cut -c1-16)"
if [[ -f "$stamp" && "${FORCE:-0}" != "1" ]]; then
  say "$VENV already holds these bounds ($(basename "$stamp"))"
else
  say "building $VENV at the lower bounds (torch $TORCH_LOWER):"
  printf '    %s\n' $constraints
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  printf '%s\n' "$constraints" > "$VENV/constraints.txt"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$VENV/constraints.txt" -e ".[notebook,test]"
  touch "$stamp"
fi
# pip must have installed exactly the bounds (a local label such as +cpu aside).
"$VENV/bin/python" - "$VENV/constraints.txt" <<'PY'
import importlib.metadata as m, sys
wrong = []
for line in open(sys.argv[1]):
    name, want = line.strip().split("==")
    have = m.version(name).split("+")[0]
    if have != want and have != want + ".0":
        wrong.append(f"{name} {have} (bound {want})")
if wrong:
    sys.exit("[lower-bounds] not at the bounds: " + ", ".join(wrong))
print(f"[lower-bounds] every requirement installed at its lower bound")
PY

# The tests of the library's core: every path through torch, transformers, numpy and pandas
# (models, the cloze interface, soft prompts, training, evaluation, mixtures, results, statistics).
# The suites of argument parsing, file safety, interruptions, exercises, releases and benchmarks
# exercise the standard library and our own tooling, and run once, at the locked versions.
CORE=(test_cloze test_models test_testing_models test_soft_prompts test_training test_evaluation
      test_mixture test_vocab_log_probs test_probing test_experiments test_data test_templates
      test_statistics test_costs test_cli)
tests=()
for t in "${CORE[@]}"; do tests+=("tests/$t.py"); done
say "unit tests of the library's core at the lower bounds: ${CORE[*]}"
# shellcheck disable=SC1091
. scripts/env.sh
# shellcheck disable=SC2086
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not site and not notebooks and not grading and not gemma" \
  "${tests[@]}" ${PYTEST_ARGS:-}
say "passed in $(( $(date +%s) - t0 )) s"
