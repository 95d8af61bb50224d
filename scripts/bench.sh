#!/usr/bin/env bash
# The drain benchmark of issue 2: Tributary (sink.kind = "null") against
# `pg_recvlogical -P pgoutput -f /dev/null` on identical backlogs of
# pgoutput changes in a throwaway PostgreSQL 15 cluster. Builds release
# binaries, then runs `tributary-bench` with the release `tributary`.
# Arguments go to `tributary-bench` (defaults: --rows 1000000
# --transactions 100 --repeat 3); see `scripts/bench.sh --help`.
# Results and how to read them: docs/benchmarks.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac

echo "==> cargo build --release (tributary, tributary-bench)" >&2
cargo build --release -p tributary -p tributary-integration-tests \
    --bin tributary --bin tributary-bench
TRIBUTARY_BIN="$target/release/tributary" exec "$target/release/tributary-bench" "$@"
