#!/usr/bin/env bash
# The MySQL drain benchmark of issue 6: Tributary's MySQL source
# (sink.kind = "null", envelopes rendered) against PyPI mysql-replication
# (python-mysql-replication, rows decoded) on the same binlog of a throwaway
# MariaDB. Builds the release binaries, installs mysql-replication into a
# virtualenv under target/, then runs `tributary-bench-mysql` (defaults:
# --rows 500000 --transactions 50 --repeat 3). Results: docs/benchmarks.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac

venv="$target/bench-venv"
if ! "$venv/bin/python" -c "import pymysqlreplication" 2>/dev/null; then
    echo "==> pip install mysql-replication==1.0.17 (into $venv)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet mysql-replication==1.0.17
fi

echo "==> cargo build --release (tributary, tributary-bench-mysql)" >&2
cargo build --release -p tributary -p tributary-integration-tests \
    --bin tributary --bin tributary-bench-mysql
exec "$target/release/tributary-bench-mysql" \
    --tributary "$target/release/tributary" --python "$venv/bin/python" "$@"
