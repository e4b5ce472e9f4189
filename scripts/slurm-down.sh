#!/bin/bash
# Stops the cluster scripts/slurm-up.sh started: cancels every job, waits
# (bounded) for the queue to empty, then stops the slurmd(s), then slurmctld
# (in that order, else slurmstepd keeps retrying and slurmd won't exit).
# Idempotent: does nothing when nothing runs. Env: WSP_SLURM_DIR.
set -uo pipefail
D=${WSP_SLURM_DIR:-/tmp/wsp-slurm}
export SLURM_CONF=$D/slurm.conf
say() { echo "slurm-down: $*" >&2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() { # pidfile: TERM, wait up to 10 s, then KILL
    local f=$1 pid
    alive "$f" || { rm -f "$f"; return 0; }
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "pid $pid ($f) ignored TERM: KILL"; kill -KILL "$pid" 2>/dev/null; fi
    rm -f "$f"
}

if alive "$D/slurmctld.pid" && [ -f "$SLURM_CONF" ]; then
    ids=$(timeout 10 squeue -h -o %i 2>/dev/null)
    # shellcheck disable=SC2086
    [ -n "$ids" ] && timeout 10 scancel --quiet $ids 2>/dev/null
    for _ in $(seq 150); do
        [ -z "$(timeout 5 squeue -h -t PD,R,CG,S,CF -o %i 2>/dev/null)" ] && break
        sleep 0.2
    done
fi
for f in "$D"/slurmd-*.pid; do [ -e "$f" ] && stop "$f"; done
stop "$D/slurmctld.pid"
say "stopped (dir $D)"
