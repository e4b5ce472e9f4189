#!/bin/bash
# Suspend and resume per GB of guest memory with real QEMU, ours against bare
# QEMU (BENCHMARKS.md, "Suspend and resume"). Builds the example in release
# mode and runs it with the arguments given, e.g.
#   scripts/bench-checkpoint.sh                       # 256 MB to 2 GB, 5 repeats, zstd and none
#   scripts/bench-checkpoint.sh --sizes 256 --repeats 2
# Holds the kvm tests' host lock (it changes the hugepage pool); run it under
# the system lock like the QEMU tests. Writes JSON to target/checkpoint-bench.json.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p wsp-pilot --example checkpoint_bench
exec target/release/examples/checkpoint_bench "$@"
