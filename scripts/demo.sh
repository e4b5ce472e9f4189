#!/usr/bin/env bash
# The local demo: a coordinator with the local batch system and pilots on
# simulated nodes; one lease destroyed, one preempted, timelines printed.
# Exit 0 only if every node ended with its original memory and no VM.
# Extra arguments go to `workspace-coordinator demo` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins
exec target/release/workspace-coordinator demo "$@"
