#!/bin/bash
# Installs the batch systems the adapter tests run for real, from Debian's
# packages, when missing. Usage: install-lrm.sh slurm|gridengine|all
# Grid Engine's client conflicts with slurm-wlm-torque (Slurm's PBS-style
# qsub/qstat wrappers): refused, not removed, when that is installed.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
want=${1:-all}
missing() { for p in "$@"; do grep -q 'install ok installed' <<<"$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" || echo "$p"; done; }
install() {
    local m; m=$(missing "$@")
    [ -z "$m" ] && return 0
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq $m
}
case $want in slurm | all) install slurm-wlm munge ;; esac
case $want in
    gridengine | all)
        if [ -z "$(missing slurm-wlm-torque)" ]; then
            echo "install-lrm: slurm-wlm-torque is installed and conflicts with gridengine-client: not installing Grid Engine" >&2
            exit 1
        fi
        install gridengine-master gridengine-exec gridengine-client
        ;;
esac
