#!/usr/bin/env bash
# Measure the minutes per exercise that book/instructors.md shows (book/exercise_times.csv).
#
# A student's first run of a worked notebook: the chapters ran before (their cached results are
# reused, as for a student who ran the chapter first), the exercise's own tables did not. So the
# worked notebooks are executed with papermill at the ci budget on a copy of the results cache
# without the exercises' tables (cached_frame names them ex01-... to ex08-...), into
# _build/executed-times/solutions/, and `python -m course_lib.exercises --times` adds up
# papermill's per-cell durations. Run it after the chapters were executed (make book-build).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/_build/executed-times"
CACHE="$OUT/results-cache"
source_cache=$(python -c \
  'from course_lib import experiments; print(experiments.results_cache_dir())')
rm -rf "$OUT"
mkdir -p "$OUT/solutions"
if [[ -d "$source_cache" ]]; then
  cp -R "$source_cache" "$CACHE"
else
  mkdir -p "$CACHE"
fi
rm -f "$CACHE"/tables/ex0[0-9]-*
for nb in solutions/[0-9][0-9]_*.ipynb; do
  echo "==> executing $nb"
  COURSE_LIB_RESULTS_CACHE="$CACHE" BOOK_BUDGET=ci papermill "$nb" "$OUT/$nb" -p BUDGET ci \
    -k python3 --cwd "$(dirname "$nb")" --log-level WARNING --no-progress-bar
done
python -m course_lib.exercises --times "$OUT/solutions"
