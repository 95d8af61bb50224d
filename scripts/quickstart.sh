#!/usr/bin/env bash
# The README quickstart in one command: install what is missing, build
# release binaries, then `tributary-dev demo`: PostgreSQL 15 on
# 127.0.0.1:54329 and kinesalite on 127.0.0.1:4567 (the addresses config.toml
# points at), `tributary run -c config.toml`, a few changes to
# public.orders, and `tributary tail` showing their envelopes.
# Extra arguments go to `tributary-dev demo` (e.g. `--config other.toml`).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"

bash scripts/install-deps.sh
echo "==> cargo build --release (tributary, tributary-dev)"
cargo build --release -p tributary -p tributary-integration-tests \
    --bin tributary --bin tributary-dev
TRIBUTARY_BIN="$target/release/tributary" exec "$target/release/tributary-dev" demo "$@"
