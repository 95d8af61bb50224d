#!/usr/bin/env bash
# Everything CI checks, in order: formatting, clippy, then every test of the
# workspace against real servers (PostgreSQL 15 and kinesalite, started by
# the tests themselves). Exits non-zero on the first failure.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

step() {
    echo "==> $*"
    "$@"
}

bash scripts/install-deps.sh
step cargo fmt --all -- --check
step cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run this binary (see tributary_bin() in
# integration-tests); build it first so they never test a stale one.
step cargo build --bin tributary
if cargo nextest --version >/dev/null 2>&1; then
    step cargo nextest run --workspace
else
    step cargo test --workspace
fi
