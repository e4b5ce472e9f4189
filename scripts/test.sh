#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine with Rust:
# installs what the tests need and verifies every command is there
# (scripts/install-deps.sh), builds every binary, checks formatting and
# lints, runs every test. Daemons the tests need are started
# by the tests themselves through scripts/*-up.sh (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }

step "system packages"
scripts/install-deps.sh

# Slurm, Grid Engine and PBS all look their own host up by name: say so
# once here rather than in forty failing tests.
getent hosts "$(hostname)" >/dev/null || {
    echo "test.sh: this host's name \"$(hostname)\" does not resolve (add it to /etc/hosts); the batch systems the tests start need it" >&2
    exit 1
}

step "OpenPBS and Torque from source (once, into /opt/wsp-lrm: scripts/pbs-build.sh)"
# About 4 min (OpenPBS) + 9 min (Torque) on 2 cores the first time, nothing
# afterwards; exit 3: no source tarball, their tests say they are skipped.
scripts/pbs-build.sh all || [ $? = 3 ]

step "build"
cargo build --workspace --bins --quiet

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

# The batch-system daemons the tests started (each test brings them up
# itself, idempotently) are stopped when the suite ends, pass or fail.
stop_daemons() {
    scripts/slurm-down.sh >/dev/null 2>&1 || echo "test.sh: scripts/slurm-down.sh failed" >&2
    scripts/sge-down.sh >/dev/null 2>&1 || echo "test.sh: scripts/sge-down.sh failed" >&2
    scripts/pbs-down.sh all >/dev/null 2>&1 || echo "test.sh: scripts/pbs-down.sh all failed" >&2
}
trap stop_daemons EXIT

step "tests"
# --no-fail-fast: one failing test binary does not hide the others' results.
cargo test --workspace --quiet --no-fail-fast -- --test-threads="${WSP_TEST_THREADS:-2}"
