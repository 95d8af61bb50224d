#!/usr/bin/env bash
# The snapshot benchmark of issue 8: `tributary run` with snapshot = "only"
# and sink.kind = "null" against `psql -c "\copy bench to /dev/null"` and
# `mariadb -e "select * from bench" > /dev/null` on one 6-column table of a
# throwaway PostgreSQL 15 and MariaDB. Builds the release `tributary` (what
# is measured) and the debug `tributary-snapshot-bench` (it only loads the
# tables and starts the readers under /usr/bin/time), then runs it
# (defaults: --rows 5000000 --repeat 3 --parallelism 1,4). Results and how
# to read them: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release -p tributary --bin tributary
bin="$(realpath "${CARGO_TARGET_DIR:-target}/release/tributary")"
exec cargo run -q -p tributary-integration-tests --bin tributary-snapshot-bench -- \
    --tributary "$bin" "$@"
