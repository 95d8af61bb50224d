#!/usr/bin/env bash
# Installs what Tributary's tests and quickstart need on a Debian machine:
# PostgreSQL 15 server binaries, MariaDB server and client (for the MySQL
# source's tests: they start their own throwaway mariadbd), openssl (the TLS
# tests' certificates), node + npm, kinesalite (npm ci, pinned in
# package-lock.json) and cargo-nextest. Idempotent, and quiet when
# everything is already there.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pg_bin=/usr/lib/postgresql/15/bin

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=no
apt_install() {
    echo "install-deps: apt-get install $*"
    if [ "$apt_updated" = no ]; then
        as_root apt-get update -qq
        apt_updated=yes
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if [ ! -x "$pg_bin/postgres" ] || [ ! -x "$pg_bin/pg_recvlogical" ]; then
    apt_install postgresql-15 postgresql-client-15
fi

if ! command -v mariadbd >/dev/null && [ ! -x /usr/sbin/mariadbd ] ||
    ! command -v mariadb-install-db >/dev/null; then
    # Installing starts no service on our machines (policy-rc.d); the tests
    # never use a system server.
    apt_install mariadb-server mariadb-client
fi

# The TLS tests make a throwaway CA and server certificate with it.
if ! command -v openssl >/dev/null; then
    apt_install openssl
fi

if ! command -v node >/dev/null; then
    # Debian's nodejs comes without npm; NodeSource's includes it.
    apt_install nodejs
fi
if ! command -v npm >/dev/null; then
    apt_install npm
fi

# kinesalite, exactly as package-lock.json pins it. npm leaves a copy of the
# lock file in node_modules: reinstall when the committed one is newer.
if [ ! -f "$root/node_modules/kinesalite/cli.js" ] ||
    [ "$root/package-lock.json" -nt "$root/node_modules/.package-lock.json" ]; then
    echo "install-deps: npm ci (kinesalite)"
    (cd "$root" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi

# The CloudEvents SDK for Python reads `sink.format = "cloudevents"` output
# in the tests, as a consumer would.
if ! python3 -c "import cloudevents.core.formats.json" >/dev/null 2>&1; then
    echo "install-deps: pip install cloudevents"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        "cloudevents==2.2.0"
fi

# AWS's own de-aggregator reads `sink.aggregation = true` records in the
# tests, as a KCL consumer would.
if ! python3 -c "import aws_kinesis_agg.deaggregator" >/dev/null 2>&1; then
    echo "install-deps: pip install aws-kinesis-agg"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        "aws-kinesis-agg==1.2.3" "protobuf==7.36.2" "six==1.17.0"
fi

# boto3 runs the consumer example of docs/consumers.md in the tests.
if ! python3 -c "import boto3" >/dev/null 2>&1; then
    echo "install-deps: pip install boto3"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        "boto3==1.43.11"
fi

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "install-deps: cargo install --locked cargo-nextest"
    cargo install --locked --quiet cargo-nextest
fi
