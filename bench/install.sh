#!/usr/bin/env bash
# Install time and size from a fresh clone: `make runtime` (what `make demo` installs), then `make venv` (adds
# dev tools and Ray for `make test`), then `make demo` itself. uv's cache starts empty (UV_CACHE_DIR in the
# scratch folder), so every package is downloaded as on a new machine; the torch file is local (/opt/wheels).
# Usage: bash bench/install.sh [scratch dir]   (prints a table; the clone is left in the scratch dir)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
scratch="${1:-$(mktemp -d /tmp/xdlabel-install.XXXX)}"
git clone -q "$repo" "$scratch/clone"
cd "$scratch/clone"
export UV_CACHE_DIR="$scratch/uv-cache" XDLABEL_DATA_DIR="$scratch/data"
t() { local s; s=$(date +%s.%N); "$@" >"$scratch/$1-$2.log" 2>&1; echo "$(date +%s.%N) - $s" | bc; }
runtime_s=$(t make runtime)
runtime_mb=$(du -sm .venv | cut -f1)
test_s=$(t make venv)
test_mb=$(du -sm .venv | cut -f1)
demo_s=$(t make demo)
printf '| step | wall s | venv MB |\n|---|---|---|\n'
printf '| make runtime (demo installs, cold cache) | %.0f | %s |\n' "$runtime_s" "$runtime_mb"
printf '| make venv (+ dev, Ray for tests) | %.0f | %s |\n' "$test_s" "$test_mb"
printf '| make demo (installed: the run itself) | %.0f | - |\n' "$demo_s"
printf '| make demo from a fresh clone (runtime + run) | %.0f | - |\n' "$(echo "$runtime_s + $demo_s" | bc)"
