#!/usr/bin/env bash
# `make test-pythons`: pip resolves course_lib on every Python version that README.md claims.
#
# The versions are pyproject.toml's classifiers (tests/test_versions.py checks that README.md says
# the same). 3.11 is this machine's Python: `make test` installs and runs everything on it. For each
# other version, pip running on that version's own interpreter (on PATH, or installed by pyenv)
# resolves course_lib[book,test,grading] from its ranges (what `pip install course_lib[...]` gives
# a user): nothing is installed, nothing is executed on that version. Where no interpreter of a
# version is found, pip resolves for it with --python-version, wheels only, and says so.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/course-pythons.XXXXXX")"
trap 'rm -rf "$work"' EXIT

mapfile -t versions < <("$PY" -c '
import tomllib
p = "Programming Language :: Python :: "
for c in tomllib.load(open("pyproject.toml", "rb"))["project"]["classifiers"]:
    if c.startswith(p) and c[len(p):].count(".") == 1:
        print(c[len(p):])')
echo "[pythons] claimed: ${versions[*]}"

resolve() {  # resolve VERSION: one resolution, its summary appended to $work/VERSION.txt
  local v="$1" out="$work/$1" interp
  mkdir -p "$out"
  # python3.X on PATH, else an installed pyenv version (pyenv's shims answer only for its global ones).
  interp=""
  for cand in "$(command -v "python$v" || true)" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v"; do
    if [[ -x "$cand" ]] && "$cand" -c 'import sys, venv' 2>/dev/null; then interp="$cand"; break; fi
  done
  if [[ -n "$interp" ]]; then
    "$interp" -m venv "$out/venv"
    "$out/venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$out/venv/bin/python" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed \
      --report "$out/report.json" "$ROOT[book,test,grading]" > "$out/log" 2>&1
    how="pip on $("$out/venv/bin/python" --version 2>&1)"
  else
    "$PY" -m pip install -q --disable-pip-version-check --dry-run --ignore-installed --only-binary=:all: \
      --python-version "$v" --report "$out/report.json" "$ROOT[book,test,grading]" > "$out/log" 2>&1
    how="pip --python-version $v (no python$v here: wheels only)"
  fi
  "$PY" - "$out/report.json" "$v" "$how" > "$work/$v.txt" <<'PY'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
v = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in items}
key = ", ".join(f"{n} {v[n]}" for n in ("torch", "numpy", "pandas", "transformers") if n in v)
print(f"Python {sys.argv[2]}: resolves ({sys.argv[3]}): {len(items)} packages; {key}")
PY
}

pids=()
for v in "${versions[@]}"; do
  [[ "$v" == "$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ]] && continue
  resolve "$v" & pids+=($!)
done
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
for v in "${versions[@]}"; do
  if [[ -f "$work/$v.txt" ]]; then cat "$work/$v.txt"
  elif [[ -d "$work/$v" ]]; then echo "Python $v: DOES NOT RESOLVE"; grep -v "is ignored" "$work/$v/log" | tail -20
  else echo "Python $v: this venv's Python; installed and tested by make test"
  fi
done
exit "$failed"
