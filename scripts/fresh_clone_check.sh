#!/usr/bin/env bash
# Run a README command as a new user would: in a fresh clone, with no .venv, no node_modules and
# no _build, and with a copy of ../shared beside it (the layout of the development machines and CI).
#
#   bash scripts/fresh_clone_check.sh [--fresh-cache] [--keep] [VAR=value ...] [TARGET ...]
#                                                                  (default TARGET: test)
#
#   VAR=value      make variables passed to every make call (e.g. CLEAN=1, PYTEST_ARGS=...)
#   TARGET         make targets to run there, in order (book, test, bench, ...); the pseudo-target
#                  `ci` runs `bash .ci/run` there instead, with CI=true and no standard input
#   --fresh-cache  also start from empty user caches (XDG_CACHE_HOME, npm's cache): pip wheels, the
#                  converted Gemma model and course_lib's downloads are then all made again
#   --keep         keep the temporary folder even when everything passed (it is always kept on failure)
#
# It clones the COMMITTED HEAD (`git clone .`): uncommitted changes are not in the clone.
# For developers only: CI must never call this (CI already runs in a fresh clone).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

fresh_cache=0
keep=0
targets=()
make_vars=()
for arg in "$@"; do
  case "$arg" in
    --fresh-cache) fresh_cache=1 ;;
    --keep) keep=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "unknown option $arg (see --help)" >&2; exit 2 ;;
    *=*) make_vars+=("$arg") ;;
    *) targets+=("$arg") ;;
  esac
done
(( ${#targets[@]} )) || targets=(test)

if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
  echo "[fresh-clone] WARNING: uncommitted changes to tracked files are NOT part of the clone:" >&2
  git status --short --untracked-files=no >&2
fi
[[ -d ../shared ]] || { echo "[fresh-clone] ERROR: no ../shared beside the repository to copy" >&2; exit 1; }

d="$(mktemp -d "${TMPDIR:-/tmp}/fresh-clone.XXXXXX")"
echo "[fresh-clone] $(date '+%F %T') copying ../shared and cloning $(git rev-parse --short HEAD) into $d"
cp -r ../shared "$d"/
git clone -q . "$d"/proj

env_args=()
if [[ "$fresh_cache" == "1" ]]; then
  mkdir -p "$d/cache" "$d/npm-cache"
  env_args+=(XDG_CACHE_HOME="$d/cache" npm_config_cache="$d/npm-cache")
  echo "[fresh-clone] with empty caches: XDG_CACHE_HOME=$d/cache npm_config_cache=$d/npm-cache"
fi

cd "$d/proj"
# What the user's shell may carry over from this checkout must not leak into the clone.
unset VIRTUAL_ENV COURSE_LIB_DATA
status=0
total_start=$(date +%s)
for target in "${targets[@]}"; do
  start=$(date +%s)
  if [[ "$target" == "ci" ]]; then
    echo "[fresh-clone] $(date '+%F %T') ==> CI=true bash .ci/run"
    env "${env_args[@]}" CI=true bash .ci/run </dev/null || status=$?
  else
    echo "[fresh-clone] $(date '+%F %T') ==> make ${make_vars[*]} $target"
    env "${env_args[@]}" make "${make_vars[@]}" "$target" || status=$?
  fi
  echo "[fresh-clone] $target: exit $status after $(( $(date +%s) - start )) s"
  [[ "$status" == "0" ]] || break
done
elapsed=$(( $(date +%s) - total_start ))

if [[ "$status" == "0" ]]; then
  echo "[fresh-clone] PASSED: ${targets[*]} in a fresh clone, $elapsed s in all"
  if [[ "$keep" == "1" ]]; then echo "[fresh-clone] kept $d"; else chmod -R u+w "$d" && rm -rf "$d"; fi
else
  echo "[fresh-clone] FAILED (exit $status) after $elapsed s; the clone is kept for inspection: $d/proj"
fi
exit "$status"
