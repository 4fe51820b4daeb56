#!/usr/bin/env bash
# Build the Jupyter Book (JB1) fully offline, strictly (-W -n --keep-going: any warning fails).
#
#   bash scripts/build_book.sh            # incremental: re-uses the jupyter-cache in _build
#   CLEAN=1 bash scripts/build_book.sh    # from an empty _build: re-executes every notebook (CI)
#   BOOK_BUDGET=gpu bash scripts/build_book.sh   # budget for the chapters' parameters (default: ci);
#                                                # a change of budget re-executes every notebook
#
# Needs: node + npm (npm registry reachable, or a warm ~/.npm cache), and the Python packages of
# `pip install -e .[book]` (an active virtualenv, else ./.venv is activated if it exists).
# Steps:
#   1. npm ci  -> node_modules/ with the exact versions in package-lock.json
#   2. copy RequireJS, @jupyter-widgets/html-manager (embed-amd.js + its icon fonts), MathJax 3
#      (es5/) and book/_ext/widgets-offline.js into _build/.offline_static/offline/, the static
#      folder that _config.yml serves (it lands in _build/html/_static/offline/)
#   3. jupyter-book build . -W -n --keep-going
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${VIRTUAL_ENV:-}" && -f "$ROOT/.venv/bin/activate" ]]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi

if [[ -d "$ROOT/_static" ]]; then
  echo "ERROR: a top-level _static/ folder exists. JB1 would then add every .js file under every" >&2
  echo "       html_static_path entry (all of MathJax) to every page. Put assets elsewhere." >&2
  exit 2
fi

start=$(date +%s)

if [[ "${CLEAN:-0}" == "1" ]]; then
  echo "==> CLEAN=1: removing _build/"
  rm -rf "$ROOT/_build"
fi

# jupyter-cache keys executed notebooks on their code only, not on BOOK_BUDGET (which the
# notebooks read): when the budget differs from the last build's, drop cached executions and
# doctrees so that every chapter runs again at the new budget.
BUDGET_STAMP="$ROOT/_build/.book_budget"
previous_budget=""   # builds without a stamp ran at the default budget
[[ -f "$BUDGET_STAMP" ]] && previous_budget="$(cat "$BUDGET_STAMP")"
if [[ -d "$ROOT/_build/.jupyter_cache" && "$previous_budget" != "${BOOK_BUDGET:-}" ]]; then
  echo "==> BOOK_BUDGET changed ('$previous_budget' -> '${BOOK_BUDGET:-}'): clearing executed notebooks"
  rm -rf "$ROOT/_build/.jupyter_cache" "$ROOT/_build/jupyter_execute" "$ROOT/_build/.doctrees" "$ROOT/_build/html"
fi
mkdir -p "$ROOT/_build"
printf '%s' "${BOOK_BUDGET:-}" > "$BUDGET_STAMP"

# npm ci wipes and reinstalls node_modules (~15 s): skip it when node_modules already matches
# package-lock.json (stamp written below), except for CLEAN=1 builds.
STAMP="$ROOT/node_modules/.book-package-lock.json"
if [[ ! -f package-lock.json ]]; then
  echo "==> npm install (no package-lock.json yet: creating it)"
  npm install --ignore-scripts --no-audit --no-fund --loglevel=error
  cp package-lock.json "$STAMP"
elif [[ "${CLEAN:-0}" == "1" ]] || ! cmp -s package-lock.json "$STAMP"; then
  echo "==> npm ci: installing the pinned JavaScript of package-lock.json"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  cp package-lock.json "$STAMP"
else
  echo "==> node_modules matches package-lock.json (npm ci skipped)"
fi

STATIC="$ROOT/_build/.offline_static"
OFF="$STATIC/offline"
echo "==> copying offline JavaScript into ${OFF#"$ROOT"/}"
rm -rf "$STATIC"
mkdir -p "$OFF/requirejs" "$OFF/html-manager" "$OFF/mathjax"
NM="$ROOT/node_modules"
cp "$NM/requirejs/require.js" "$OFF/requirejs/require.js"
# embed-amd.js defines @jupyter-widgets/{base,controls,html-manager} as AMD modules (needs RequireJS)
# and renders every <script type="application/vnd.jupyter.widget-view+json"> on the page.
# webpack resolves the Font Awesome files it references relative to the script: copy them too.
HM="$NM/@jupyter-widgets/html-manager/dist"
cp "$HM/embed-amd.js" "$OFF/html-manager/"
find "$HM" -maxdepth 1 -type f \( -name '*.woff2' -o -name '*.woff' -o -name '*.ttf' \
  -o -name '*.eot' -o -name '*.svg' \) -exec cp {} "$OFF/html-manager/" \;
# Our glue between the two (module path for the fonts, MathJax 2 -> 3 typesetting bridge).
cp "$ROOT/book/_ext/widgets-offline.js" "$OFF/widgets-offline.js"
# MathJax 3: the whole es5/ tree (components, fonts, TeX extensions loaded on demand, a11y/sre).
cp -R "$NM/mathjax/es5/." "$OFF/mathjax/"
for f in "$OFF/requirejs/require.js" "$OFF/widgets-offline.js" "$OFF/html-manager/embed-amd.js" "$OFF/mathjax/tex-mml-chtml.js"; do
  [[ -s "$f" ]] || { echo "ERROR: missing $f" >&2; exit 1; }
done

echo "==> jupyter-book build (strict)"
build_start=$(date +%s)
jupyter-book build "$ROOT" -W -n --keep-going
end=$(date +%s)

INDEX="$ROOT/_build/html/index.html"
[[ -f "$INDEX" ]] || { echo "ERROR: $INDEX was not produced" >&2; exit 1; }
echo "==> built in $((end - start)) s (jupyter-book: $((end - build_start)) s)"
echo "$INDEX"
