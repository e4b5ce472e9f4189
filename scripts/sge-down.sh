#!/bin/bash
# Stops the cell scripts/sge-up.sh started: deletes every job and advance
# reservation (both outlive a qmaster restart), waits
# (bounded) for the queue to empty, stops execd, then qmaster. Idempotent.
set -uo pipefail
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
say() { echo "sge-down: $*" >&2; }
if timeout 5 qstat >/dev/null 2>&1; then
    timeout 10 qdel -f -u '*' >/dev/null 2>&1
    for _ in $(seq 100); do [ -z "$(timeout 5 qstat -u '*' 2>/dev/null)" ] && break; sleep 0.1; done
    for ar in $(timeout 5 qrstat -u '*' 2>/dev/null | awk 'NR > 2 && $1 ~ /^[0-9]+$/ {print $1}'); do
        timeout 10 qrdel "$ar" >/dev/null 2>&1
    done
    timeout 10 qconf -ke all >/dev/null 2>&1
    timeout 10 qconf -km >/dev/null 2>&1
fi
# Pidfiles (Debian spool layout); never by process name.
for f in /var/spool/gridengine/execd/*/execd.pid /var/spool/gridengine/qmaster/qmaster.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "pid $pid ($f) still up: TERM"; kill -TERM "$pid" 2>/dev/null; sleep 1; kill -KILL "$pid" 2>/dev/null; fi
    rm -f "$f"
done
say "stopped"
