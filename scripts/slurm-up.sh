#!/bin/bash
# Starts a two-node Slurm cluster (nodes n1, n2: two slurmd on this host, on
# loopback) for tests. Idempotent: stops what an earlier run left first.
# Installs nothing (see scripts/install-lrm.sh). Last line on stdout:
#   export SLURM_CONF=<dir>/slurm.conf
# Env: WSP_SLURM_DIR (default /tmp/wsp-slurm), WSP_SLURM_PORT (6817),
#      WSP_SLURM_NODE_PORT (17001: n1, +1: n2), WSP_SLURM_WAIT_S (30).
set -euo pipefail
# The daemons started here must not inherit our caller's descriptors: a
# `flock LOCK cmd` lock held by munged or slurmctld would never be released,
# and a test harness's pipe would never see its end. Keep 0-2 and bash's own
# script descriptor (255).
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    if [ "$fd" -gt 2 ] && [ "$fd" -ne 255 ]; then eval "exec $fd>&-" 2>/dev/null || true; fi
done
here=$(cd "$(dirname "$0")" && pwd)
D=${WSP_SLURM_DIR:-/tmp/wsp-slurm}
PORT=${WSP_SLURM_PORT:-6817}
NP=${WSP_SLURM_NODE_PORT:-17001}
WAIT=${WSP_SLURM_WAIT_S:-30}
say() { echo "slurm-up: $*" >&2; }
die() { say "$*"; exit 1; }

for b in slurmctld slurmd sbatch squeue scancel sinfo munged munge unmunge; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found: install Debian's slurm-wlm and munge (scripts/install-lrm.sh slurm)"
done
[ "$(id -u)" = 0 ] || die "must run as root (slurmd runs jobs as their owners)"

# Leftovers of an earlier run (by pidfile; never by process name).
WSP_SLURM_DIR=$D "$here/slurm-down.sh" >&2 || true

# munge: the authentication every Slurm daemon and client uses.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

mkdir -p "$D/state" "$D/log" "$D/spool/n1" "$D/spool/n2"
sed -e "s#@DIR@#$D#g" -e "s#@PORT@#$PORT#g" -e "s#@NODE_PORT1@#$NP#g" -e "s#@NODE_PORT2@#$((NP + 1))#g" \
    "$here/slurm-2node.conf.in" > "$D/slurm.conf"
export SLURM_CONF=$D/slurm.conf

# -c: start with no jobs from an earlier run's saved state. -c keeps saved
# reservations, so drop those too: a test cut short must not leave a
# reservation holding nodes in the next run.
rm -f "$D/state/resv_state" "$D/state/resv_state.old"
slurmctld -c -f "$SLURM_CONF" || die "slurmctld did not start (see $D/log/slurmctld.log)"
for n in n1 n2; do
    slurmd -c -f "$SLURM_CONF" -N "$n" || die "slurmd -N $n did not start (see $D/log/slurmd-$n.log)"
done

deadline=$((SECONDS + WAIT))
until [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 == "idle"' | wc -l)" = 2 ]; do
    if [ $SECONDS -ge $deadline ]; then
        sinfo -N >&2 || true
        tail -n 20 "$D/log/slurmctld.log" >&2 || true
        die "nodes n1, n2 not idle after ${WAIT}s"
    fi
    sleep 0.2
done
say "n1, n2 idle (dir $D)"
echo "export SLURM_CONF=$SLURM_CONF"
