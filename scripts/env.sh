# shellcheck shell=bash
# Default environment for the project's scripts and Makefile. SOURCE it (bash), don't run it:
#
#   . scripts/env.sh
#
# COURSE_LIB_DATA: where course_lib reads the paper's data (see course_lib/data.py). When it is
# unset and the shared data folder sits beside the repository (../shared/data, as on the
# development machines and in CI), it is exported as that folder's absolute path. A value that is
# already set is never changed. Without either, course_lib falls back to its per-user cache and
# downloads what it needs.
#
# Nothing else is exported; sourcing this twice is harmless.

__course_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${COURSE_LIB_DATA:-}" && -d "$__course_root/../shared/data" ]]; then
  COURSE_LIB_DATA="$(cd "$__course_root/../shared/data" && pwd)"
  export COURSE_LIB_DATA
  echo "[env] COURSE_LIB_DATA=$COURSE_LIB_DATA (default: ../shared/data beside the repository)" >&2
fi
unset __course_root
