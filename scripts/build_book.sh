#!/usr/bin/env bash
# Build the Jupyter Book (JB1) fully offline, strictly (-W -n --keep-going: any warning fails).
#
#   bash scripts/build_book.sh            # incremental: re-uses the jupyter-cache in _build
#   CLEAN=1 bash scripts/build_book.sh    # from an empty _build: re-executes every notebook (CI)
#   BOOK_BUDGET=gpu bash scripts/build_book.sh   # budget for the chapters' parameters (default: ci);
#                                                # a change of budget re-executes every notebook
# The chapters are executed by scripts/execute_book.sh (papermill) into _build/executed/, and the
# site is built from those executed notebooks (execution off in a staged copy of the sources).
#
# Needs: node + npm (npm registry reachable, or a warm ~/.npm cache), and the Python packages of
# `pip install -e .[book]` (an active virtualenv, else ./.venv is activated if it exists).
# Steps:
#   1. npm ci  -> node_modules/ with the exact versions in package-lock.json
#   2. copy RequireJS, @jupyter-widgets/html-manager (embed-amd.js + its icon fonts), MathJax 3
#      (es5/) and book/_ext/widgets-offline.js into _build/.offline_static/offline/, the static
#      folder that _config.yml serves (it lands in _build/html/_static/offline/)
#   3. papermill: execute the chapters, then the worked exercises, into _build/executed/
#      (scripts/execute_book.sh)
#   4. jupyter-book build of a staged copy with the executed notebooks, -W -n --keep-going
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

mkdir -p "$ROOT/_build"

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

# The exercise pages: the worked solutions (code folded, answers in closed dropdowns), executed like the
# chapters so that every answer that refers to a result shows it; or, for a course that grades them,
# the student versions, unexecuted. `course.include_solutions` in _config.yml decides.
include=$(python -c 'import yaml; c = yaml.safe_load(open("_config.yml")); print(1 if (c.get("course") or {}).get("include_solutions", True) else 0)')

echo "==> executing the chapters (and the worked exercises: $include) with papermill (BOOK_BUDGET=${BOOK_BUDGET:-ci})"
EXECUTE_SOLUTIONS="$include" bash "$ROOT/scripts/execute_book.sh"

# The site is built from the executed notebooks: a staging copy of the book's sources in which
# each chapter is replaced by its executed version, built with execution turned off.
STAGE="$ROOT/_build/stage"
echo "==> staging the executed notebooks in ${STAGE#"$ROOT"/}"
rm -rf "$STAGE"
mkdir -p "$STAGE/_build"
cp -R "$ROOT/book" "$STAGE/book"
cp -R "$ROOT/_build/executed/book/." "$STAGE/book/"
find "$STAGE/book" -name '*.partial.ipynb' -delete
cp "$ROOT/_toc.yml" "$STAGE/_toc.yml"
# Files the chapters show with {literalinclude}.
mkdir -p "$STAGE/scripts"
cp -R "$ROOT/scripts/cluster" "$STAGE/scripts/cluster"
mkdir -p "$STAGE/exercises"
if [[ "$include" == 1 ]]; then
  cp "$ROOT"/_build/executed/solutions/[0-9][0-9]_*.ipynb "$STAGE/exercises/"
else
  cp "$ROOT"/exercises/[0-9][0-9]_*.ipynb "$STAGE/exercises/"
fi
sed 's/^\(  *execute_notebooks:\).*/\1 "off"/' "$ROOT/_config.yml" > "$STAGE/_config.yml"
grep -q 'execute_notebooks: "off"' "$STAGE/_config.yml" || { echo "ERROR: could not turn execution off in the staged _config.yml" >&2; exit 1; }
ln -s "$STATIC" "$STAGE/_build/.offline_static"

echo "==> jupyter-book build (strict)"
build_start=$(date +%s)
jupyter-book build "$STAGE" -W -n --keep-going
rm -rf "$ROOT/_build/html"
mv "$STAGE/_build/html" "$ROOT/_build/html"
end=$(date +%s)

INDEX="$ROOT/_build/html/index.html"
[[ -f "$INDEX" ]] || { echo "ERROR: $INDEX was not produced" >&2; exit 1; }
echo "==> built in $((end - start)) s (jupyter-book: $((end - build_start)) s)"
echo "$INDEX"
