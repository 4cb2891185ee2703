#!/usr/bin/env bash
# Install time and size from a fresh clone: `make runtime` (what `make demo` installs), then `make venv` (adds
# dev tools and Ray for `make test`), then `make demo` itself, twice (the first run also compiles the bytecode
# of what it imports). uv's cache starts empty (UV_CACHE_DIR in the scratch folder), so every package is
# downloaded as on a new machine; the torch file is local (/opt/wheels). Wall time depends on what else runs:
# CPU seconds (user + system, children included) are printed beside it, and the load average at the start.
# Usage: bash bench/install.sh [scratch dir]   (prints a table; the clone is left in the scratch dir)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${1:-$(mktemp -d /tmp/xdlabel-install.XXXX)}"
git clone -q "$repo" "$scratch/clone"
cd "$scratch/clone"
export UV_CACHE_DIR="$scratch/uv-cache" XDLABEL_DATA_DIR="$scratch/data"
TIMEFORMAT='%R %U %S'
step() {  # prints "wall cpu" of one make target
  local out
  out=$( { time make "$1" >"$scratch/$1-$2.log" 2>&1; } 2>&1 )
  read -r wall user sys <<<"$out"
  printf '%.0f %.0f' "$wall" "$(echo "$user + $sys" | bc)"
}
load=$(cut -d' ' -f1 /proc/loadavg)
read -r rw rc <<<"$(step runtime 1)"; runtime_mb=$(du -sm .venv | cut -f1)
read -r tw tc <<<"$(step venv 1)"; test_mb=$(du -sm .venv | cut -f1)
rm -rf "$XDLABEL_DATA_DIR"; read -r d1w d1c <<<"$(step demo 1)"
rm -rf "$XDLABEL_DATA_DIR"; read -r d2w d2c <<<"$(step demo 2)"
echo "load average at the start: $load (2 cores)"
printf '| step | wall s | CPU s | .venv MB |\n|---|---|---|---|\n'
printf '| make runtime (what make demo installs; cold cache) | %s | %s | %s |\n' "$rw" "$rc" "$runtime_mb"
printf '| make venv (adds dev + Ray for make test) | %s | %s | %s |\n' "$tw" "$tc" "$test_mb"
printf '| make demo, first run | %s | %s | |\n' "$d1w" "$d1c"
printf '| make demo, second run | %s | %s | |\n' "$d2w" "$d2c"
printf '| make demo from a fresh clone: runtime + first run | %s | %s | |\n' "$((rw + d1w))" "$((rc + d1c))"
