#!/usr/bin/env bash
# Execute every chapter on a tiny random-weight model of each family (masked, seq2seq, causal), the
# stand-ins for the paper's bert-base-cased, facebook/bart-base and a causal LM such as GPT-2, so that
# a student's switch of MODEL is a tested path: every by-hand check runs with its assertions on.
# Random weights test the mechanics (shapes, hooks, by hand = library), never knowledge.
#
#   bash scripts/test_families.sh [model ...]     (default: tiny-bert tiny-bart tiny-gpt2)
#
# Two families run at a time, one thread each (the machines have two cores). Each family's
# chapters land in _build/executed-<model>/ with a times.tsv; the script fails if any chapter fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
models=("$@")
(( ${#models[@]} )) || models=(tiny-bert tiny-bart tiny-gpt2)
BUDGET="${BOOK_BUDGET:-ci}"
logs="$ROOT/_build/families"
mkdir -p "$logs"
start=$(date +%s)
printf '%s\n' "${models[@]}" | OMP_NUM_THREADS=1 xargs -P 2 -I{} bash -c \
  'BOOK_MODEL={} BOOK_BUDGET='"$BUDGET"' KEEP_GOING=1 bash scripts/execute_book.sh > "'"$logs"'/{}.log" 2>&1 \
     && echo "==> {}: every chapter passed" || echo "==> {}: FAILED (log: _build/families/{}.log)"' \
  | tee "$logs/summary.txt"
echo "==> seconds per chapter, budget $BUDGET (all families in $(( $(date +%s) - start )) s):"
python - "${models[@]}" <<'PY'
import sys
from pathlib import Path

columns = {}
for model in sys.argv[1:]:
    times = Path(f"_build/executed-{model}/times.tsv")
    rows = [line.split("\t") for line in times.read_text().splitlines()] if times.is_file() else []
    columns[model] = {nb: t for nb, t in rows}
chapters = sorted({nb for col in columns.values() for nb in col})
print(f"{'chapter':40s}" + "".join(f"{m:>14s}" for m in columns))
for nb in chapters:
    print(f"{nb:40s}" + "".join(f"{columns[m].get(nb, '-'):>14s}" for m in columns))
PY
failed=0
for m in "${models[@]}"; do
  # Sphinx would report a glue key that no cell glued only when building the site, from the default
  # model's run: check every family's executed chapters for them here.
  if ! python scripts/check_glue.py "_build/executed-$m"/book/*.ipynb >> "$logs/$m.log" 2>&1; then
    echo "==> $m: the text names glue keys that no cell glued" | tee -a "$logs/summary.txt"
    failed=1
  fi
  if grep -q "FAILED" "$logs/$m.log" || ! grep -q "execution time per chapter" "$logs/$m.log"; then
    failed=1
    echo "---- $m: last lines of $logs/$m.log" >&2
    grep -v 'IPKernelApp' "$logs/$m.log" | tail -40 >&2
  fi
done
exit "$failed"
