#!/bin/bash
# The benchmark (see BENCHMARKS.md): builds the release binaries, then runs
# workspace-bench with the arguments given, e.g.
#   scripts/bench.sh --quick          # under two minutes
#   scripts/bench.sh                  # the full run (1 to 1024 nodes, 10,000 pilots, Slurm if installed)
#   scripts/bench.sh --parts load --pilots 10000
# Prints a table per part; writes JSON to target/bench.json (--json FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -q
exec target/release/workspace-bench "$@"
