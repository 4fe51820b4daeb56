#!/usr/bin/env bash
# Execute every chapter listed in _toc.yml with papermill at BOOK_BUDGET (default ci) into
# _build/executed/<same path>.ipynb, then the worked exercises (solutions/NN_*.ipynb, unless
# EXECUTE_SOLUTIONS=0), and print how long each took. The site is built from these executed
# notebooks (scripts/build_book.sh); nbval re-runs the chapters (make test-notebooks). The worked
# exercises run after the chapters, whose cached results their experiments reuse
# (scripts/exercise_times.sh measures their minutes per exercise the same way).
#
# BOOK_MODEL=<name> executes the chapters on another model (papermill sets the chapters' MODEL)
# into _build/executed-<name>/ instead: `make test-families` runs them on a tiny random model of
# each family (masked, seq2seq, causal), so that every by-hand check runs on every family.
#
# A chapter is re-executed only when its source or the library (course_lib/) is newer than its
# executed copy, or the budget changed; expensive results inside chapters are cached on disk anyway (course_lib.experiments).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BUDGET="${BOOK_BUDGET:-ci}"
MODEL="${BOOK_MODEL:-}"
if [[ -n "$MODEL" ]]; then
  OUT="$ROOT/_build/executed-${MODEL//\//--}"
  model_args=(-p MODEL "$MODEL")
else
  OUT="$ROOT/_build/executed"
  model_args=()
fi
mkdir -p "$OUT"
stamp="$OUT/.budget"
if [[ -f "$stamp" && "$(cat "$stamp")" != "$BUDGET" ]]; then
  echo "==> budget changed ($(cat "$stamp") -> $BUDGET): re-executing every chapter"
  rm -rf "$OUT"; mkdir -p "$OUT"
fi
printf '%s' "$BUDGET" > "$stamp"

mapfile -t notebooks < <(python - <<'PY'
import yaml
from pathlib import Path
toc = yaml.safe_load(Path("_toc.yml").read_text())
def walk(node):
    if isinstance(node, dict):
        if "file" in node:
            yield node["file"]
        for key in ("parts", "chapters", "sections"):
            for child in node.get(key, []) or []:
                yield from walk(child)
for f in walk(toc):
    # Chapters only here; the worked exercises follow (their pages are staged from solutions/).
    if f.startswith("book/") and Path(f + ".ipynb").is_file():
        print(f + ".ipynb")
PY
)
if [[ "${EXECUTE_SOLUTIONS:-1}" == "1" ]]; then
  notebooks+=(solutions/[0-9][0-9]_*.ipynb)
fi
times="$OUT/times.tsv"
failed=()
: > "$times.new"
for nb in "${notebooks[@]}"; do
  dest="$OUT/$nb"
  mkdir -p "$(dirname "$dest")"
  # Up to date: executed after the chapter and after every change to the library it runs on.
  if [[ -f "$dest" && "$dest" -nt "$nb" && -z "$(find course_lib -name '*.py' -newer "$dest" -print -quit)" ]]; then
    echo "==> $nb: up to date"
    grep -P "^\Q$nb\E\t" "$times" >> "$times.new" 2>/dev/null || true
    continue
  fi
  echo "==> executing $nb (BUDGET=$BUDGET${MODEL:+, MODEL=$MODEL})"
  start=$(date +%s)
  # Written next to the final path and renamed: an interrupted run never leaves a half-executed
  # notebook that a later build would take for a finished one.
  if BOOK_BUDGET="$BUDGET" papermill "$nb" "$dest.partial.ipynb" -p BUDGET "$BUDGET" "${model_args[@]}" -k python3 \
    --cwd "$(dirname "$nb")" --log-level WARNING --no-progress-bar; then
    mv "$dest.partial.ipynb" "$dest"
    printf '%s\t%s\n' "$nb" "$(( $(date +%s) - start ))" >> "$times.new"
  else
    failed+=("$nb")
    printf '%s\tFAILED after %s\n' "$nb" "$(( $(date +%s) - start ))" >> "$times.new"
    # KEEP_GOING=1 (make test-families): execute the other chapters too, and fail at the end.
    [[ "${KEEP_GOING:-0}" == "1" ]] || { mv "$times.new" "$times"; exit 1; }
  fi
done
mv "$times.new" "$times"
echo "==> execution time per chapter (seconds, budget $BUDGET${MODEL:+, model $MODEL}):"
column -t "$times" || cat "$times"
if (( ${#failed[@]} )); then
  echo "==> FAILED${MODEL:+ on $MODEL}: ${failed[*]} (the partial notebooks are beside them in ${OUT#"$ROOT"/}/)" >&2
  exit 1
fi
