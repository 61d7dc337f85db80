# Sourced by setup.sh and check_torch211.sh. A fresh environment with the CUDA build of torch needs several
# GiB. When pip runs out of space, it fails half-way with "[Errno 28] No space left on device" and leaves a
# broken environment behind. Checking first gives a clear message instead.

_existing() { local p=$1; while [ ! -e "$p" ]; do p=$(dirname "$p"); done; echo "$p"; }
_free_kib() { df -Pk "$1" | awk 'NR == 2 { print $4 }'; }

_require() {  # _require PATH GIB WHAT
  local free_kib
  free_kib=$(_free_kib "$1")
  if [ -n "$free_kib" ] && [ "$free_kib" -lt $(($2 * 1024 * 1024)) ]; then
    echo "error: $3 needs about $2 GiB free on the filesystem of $1, and $((free_kib / 1024)) MiB are free." \
         "Free some space (or point TMPDIR at a roomier filesystem) and run again." >&2
    exit 1
  fi
}

# require_free_space DIR TOTAL_GIB TMP_GIB WHAT: stop unless the filesystem that will hold DIR has TOTAL_GIB
# free. pip unpacks its downloads under $TMPDIR: when that is another filesystem, it needs TMP_GIB of its own.
require_free_space() {
  local dir tmp
  dir=$(_existing "$1")
  tmp=$(_existing "${TMPDIR:-/tmp}")
  _require "$dir" "$2" "$4"
  if [ "$(stat -c %d "$dir")" != "$(stat -c %d "$tmp")" ]; then
    _require "$tmp" "$3" "$4 (its downloads, under TMPDIR)"
  fi
}

# require_free_space_for_env VENV TOTAL_GIB TMP_GIB WHAT: require_free_space for a virtual environment that
# does not have torch yet; an environment that already imports torch is reused, and a rerun needs no room.
require_free_space_for_env() {
  if ! { [ -x "$1/bin/python" ] && "$1/bin/python" -c "import torch" 2>/dev/null; }; then
    require_free_space "$@"
  fi
}
