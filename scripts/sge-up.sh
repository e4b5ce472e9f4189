#!/bin/bash
# Starts a single-host Son of Grid Engine cell (Debian's cell "default" at
# /var/lib/gridengine: qmaster + execd + queue all.q from sge-all.q.conf with
# the parallel environment "wsp" from sge-wsp.pe.conf, control_slaves TRUE
# for qrsh -inherit). Idempotent: stops what an earlier run left first.
# Installs nothing (scripts/install-lrm.sh gridengine). Last lines on stdout:
#   export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
# Env: WSP_SGE_DIR (scratch, default /tmp/wsp-sge), WSP_SGE_WAIT_S (30).
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
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
W=${WSP_SGE_DIR:-/tmp/wsp-sge}
WAIT=${WSP_SGE_WAIT_S:-30}
say() { echo "sge-up: $*" >&2; }
die() { say "$*"; exit 1; }
for b in /usr/sbin/sge_qmaster /usr/sbin/sge_execd qconf qsub qstat qdel qrsh; do
    command -v "$b" >/dev/null 2>&1 || die "$b not found: install Debian's gridengine-master gridengine-exec gridengine-client (scripts/install-lrm.sh gridengine)"
done
[ -d "$SGE_ROOT/$SGE_CELL/common" ] || die "no cell at $SGE_ROOT/$SGE_CELL (the Debian postinst creates it)"
[ "$(id -u)" = 0 ] || die "must run as root"
"$here/sge-down.sh" >&2 || true
mkdir -p "$W/cfg"
# 127.0.0.1 reverse-resolves to "localhost" but gethostname() is e.g. "vm":
# tell SGE they are the same host (else qmaster refuses every client).
echo "localhost $(hostname)" > "$SGE_ROOT/$SGE_CELL/common/host_aliases"
mkdir -p /var/run/gridengine && chown sgeadmin:sgeadmin /var/run/gridengine
/usr/sbin/sge_qmaster
bounded() { # what, command...: retries for WAIT seconds
    local what=$1 deadline=$((SECONDS + WAIT)); shift
    until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $deadline ] || die "$what not after ${WAIT}s"; sleep 0.1; done
}
bounded "qmaster answering" qstat
# Global conf: root may submit (min_uid 1000 by default), faster load reports.
qconf -sconf | sed -e '/^#global:/d' -e 's/^min_uid .*/min_uid 0/' -e 's/^min_gid .*/min_gid 0/' \
    -e 's/^load_report_time .*/load_report_time 00:00:05/' -e 's/^max_advance_reservations .*/max_advance_reservations 64/' > "$W/cfg/global"
(cd "$W/cfg" && qconf -Mconf global) >/dev/null   # file name must be the config name
# weight_priority 1: job priorities (qsub -p) order the queue, as in Grid
# Engine's own install templates (Debian's package leaves it 0); the urgent
# leases' batch_priority tests need it (docs/POOL.md).
qconf -ssconf | sed -e 's/^schedule_interval .*/schedule_interval 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec 1/' -e 's/^flush_finish_sec .*/flush_finish_sec 1/' \
    -e 's/^weight_priority .*/weight_priority 1.000000/' > "$W/sched.conf"
qconf -Msconf "$W/sched.conf" >/dev/null
qconf -as localhost >/dev/null 2>&1 || true   # submit host
/usr/sbin/sge_execd
bounded "execd registered" sh -c 'qconf -sel | grep -q localhost'
# PE before the queue that names it; add, or modify when an earlier run made it.
qconf -sp wsp >/dev/null 2>&1 && qconf -Mp "$here/sge-wsp.pe.conf" >/dev/null || qconf -Ap "$here/sge-wsp.pe.conf" >/dev/null
qconf -sq all.q >/dev/null 2>&1 && qconf -Mq "$here/sge-all.q.conf" >/dev/null || qconf -Aq "$here/sge-all.q.conf" >/dev/null
bounded "queue all.q@localhost usable" sh -c 'qstat -f -q all.q 2>/dev/null | grep -q "^all.q@" && ! qstat -f -q all.q | grep "^all.q@" | grep -qE " (au|u|E|d|D)\$"'
say "cell up: queue all.q, parallel environment wsp (notify 5 s)"
echo "export SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL"
