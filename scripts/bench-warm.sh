#!/bin/sh
# Warm restore against cold boot on one pool slot (BENCHMARKS.md, "Warm VMs"):
# the pilot built in release mode, driven by its fake coordinator.
#   scripts/bench-warm.sh          real QEMU (TCG here): holds the kvm tests'
#                                  host lock and changes the hugepage pool;
#                                  on a shared host run it under the system lock
#   scripts/bench-warm.sh --sim    the sim node: the pilot's own work only
# WSP_BENCH_REPEATS sets the starts of each kind (5 real, 20 sim);
# WSP_BENCH_JSON=path also writes the real run's medians as JSON.
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--sim" ]; then
    exec cargo test --release -p wsp-pilot --test pool -- --ignored --nocapture \
        --exact bench_sim_warm_start_against_cold_start
fi
exec cargo test --release -p wsp-pilot --test kvm_pool -- --ignored --nocapture \
    --exact bench_warm_start_against_cold_boot
