#!/usr/bin/env bash
# The Colab-like check (`make test-colab`): would a student's Colab session work?
#
#   1. a fresh venv (.venv-colab) with Colab's published versions of the packages the book shares
#      with Colab (tests/colab/colab-runtime.txt: torch, numpy, pandas, ipykernel, ipywidgets,
#      matplotlib, transformers and their kernel stack) and Colab's pip;
#   2. the data archives, rebuilt from ../shared/data, checked against the registry and served on
#      127.0.0.1 (COURSE_LIB_ARCHIVE_URL_BASE): no COURSE_LIB_DATA, an empty cache, as on Colab;
#   3. chapter 1 (book/01_asking.ipynb), then the worked exercises of chapter 1
#      (solutions/01_asking.ipynb), each run top to bottom in a fresh kernel of that venv. Their own
#      first cell installs course_lib from this checkout (COURSE_LIB_INSTALL, which the cell honours)
#      and whatever course_lib needs that is missing; tests/colab/run_notebooks.py checks that
#      nothing of Colab's was replaced, no restart was asked for, every check passed, the data came
#      as archives and the install holds no solutions.
#
# Needs network to PyPI (Colab's versions, and what the install cell adds, come from there).
# The executed notebooks are left in _build/colab/ for reading.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-colab"
OUT="$ROOT/_build/colab"
RUNTIME="$ROOT/tests/colab/colab-runtime.txt"
COLAB_PIP="24.1.2"  # Colab's pip (same source as colab-runtime.txt)
say() { echo "[colab] $*"; }
t0=$(date +%s)

DATA="${COURSE_LIB_DATA:-$ROOT/../shared/data}"
[[ -d "$DATA" ]] || { echo "[colab] no data folder at $DATA to build the archives from" >&2; exit 1; }

say "fresh venv $VENV with Colab's versions ($(basename "$RUNTIME"))"
rm -rf "$VENV" "$OUT"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "pip==$COLAB_PIP"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$RUNTIME"
fresh='import importlib.util as u; raise SystemExit(u.find_spec("course_lib") is None)'
if (cd / && "$VENV/bin/python" -c "$fresh"); then
  echo "[colab] course_lib is importable before the install cell ran: not a fresh venv" >&2; exit 1
fi

mkdir -p "$OUT/archives" "$OUT/work"
say "data archives rebuilt from $DATA and checked against the registry"
"$PYTHON" scripts/make_data_registry.py "$DATA" --check --archives "$OUT/archives"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PYTHON" -m http.server "$port" --bind 127.0.0.1 --directory "$OUT/archives" > "$OUT/http.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q "Serving HTTP" "$OUT/http.log" 2>/dev/null && break; sleep 0.1; done

say "chapter 1 and the worked exercises of chapter 1, each in a fresh kernel"
cd "$OUT/work"  # not the checkout: nothing there may be importable by accident
env -u COURSE_LIB_DATA -u PYTHONPATH -u VIRTUAL_ENV \
  COURSE_LIB_INSTALL="$ROOT" \
  COURSE_LIB_CACHE="$OUT/cache" \
  COURSE_LIB_ARCHIVE_URL_BASE="http://127.0.0.1:$port" \
  HF_HUB_OFFLINE=1 BOOK_BUDGET=ci PATH="$VENV/bin:$PATH" \
  "$VENV/bin/python" "$ROOT/tests/colab/run_notebooks.py" "$OUT" "$RUNTIME" \
    "$ROOT/book/01_asking.ipynb" "$ROOT/solutions/01_asking.ipynb"
requests="$(grep -c '"GET /' "$OUT/http.log" || true)"
say "archive requests served: $requests"
(( requests >= 1 )) || { echo "[colab] the notebooks never asked for a data archive" >&2; exit 1; }
say "passed in $(( $(date +%s) - t0 )) s"
