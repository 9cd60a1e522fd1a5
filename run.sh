#!/usr/bin/env bash
# equishift's two entry points on a fresh machine; both set everything up first (idempotent).
#   bash run.sh dashboard   set up, then start the dashboard on http://127.0.0.1:8501
#   bash run.sh test        set up, then run the whole test suite (offline, CPU)
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-}
shift || true
case "$cmd" in
  dashboard)
    bash scripts/setup.sh
    # glibc keeps freed sweep buffers in per-thread heaps otherwise: resident memory then exceeds the
    # sweep memory budget and grows with the number of sessions (docs/deployment.md, "Memory"). Override by exporting.
    export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-131072} MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-2}
    exec .venv/bin/python -m dashboard.serve "$@"
    ;;
  test)
    bash scripts/setup.sh
    export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    exec .venv/bin/python -m pytest -ra --durations=15 "$@"
    ;;
  *)
    echo "usage: bash run.sh dashboard|test [extra args]" >&2
    exit 2
    ;;
esac
