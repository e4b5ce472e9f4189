#!/bin/bash
# Stops what scripts/pbs-up.sh started and leaves the machine as it was:
# deletes every job (bounded wait), stops the daemons (through the servers'
# own commands, then by the PIDs of processes whose executable is in the
# flavour's prefix, never by name), removes /etc/pbs.conf, and once neither
# flavour runs, the nodes' network namespaces (and any process left in
# them), the bridge and the /etc/hosts names. The homes in /var/spool
# (databases, job history, the moms' homes) are kept for a faster next
# start: --purge removes them too.
# The service user is kept (userdel wsppilot removes it).
#
# usage: pbs-down.sh [openpbs|torque|all] [--purge]     (default: all)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/pbs-common.sh
. "$here/pbs-common.sh"
WHICH=all
PURGE=0
for a in "$@"; do
    case $a in
        openpbs | torque | all) WHICH=$a ;;
        --purge) PURGE=1 ;;
        *)
            echo "usage: $0 [openpbs|torque|all] [--purge]" >&2
            exit 2
            ;;
    esac
done
[ "$(id -u)" = 0 ] || die "must run as root"

openpbs_down() {
    local P=$OPENPBS
    [ -x "$P/sbin/pbs_server" ] || return 0
    if [ -f "$OPENPBS_CONF" ] && grep -q "^PBS_EXEC=$P\$" "$OPENPBS_CONF"; then
        export PBS_CONF_FILE=$OPENPBS_CONF
        if timeout 10 "$P/bin/qstat" -B >/dev/null 2>&1; then
            local jobs
            jobs=$(timeout 10 "$P/bin/qselect" 2>/dev/null)
            if [ -n "$jobs" ]; then
                # shellcheck disable=SC2086
                timeout 20 "$P/bin/qdel" -W force $jobs >/dev/null 2>&1
                for _ in $(seq 100); do [ -z "$(timeout 10 "$P/bin/qselect" 2>/dev/null)" ] && break; sleep 0.1; done
            fi
        fi
        local n
        for n in $(node_names); do
            [ -f "/etc/netns/$(node_ns "$n")/pbs.conf" ] || continue
            grep -q "^$(node_ns "$n")\b" <<<"$(ip netns list)" || continue
            in_node "$n" timeout 60 "$P/libexec/pbs_init.d" stop >/dev/null 2>&1
        done
        # pbs_init.d does nothing when the server's name does not resolve
        if getent ahostsv4 "$PBS_HOSTNAME" >/dev/null; then
            timeout 60 "$P/libexec/pbs_init.d" stop >/dev/null 2>&1
        fi
        if timeout 10 "$P/sbin/pbs_dataservice" status >/dev/null 2>&1; then
            timeout 30 "$P/sbin/pbs_dataservice" stop >/dev/null 2>&1
        fi
    fi
    stop_prefix_pids "$P"
    # the datastore is Debian's postgres binary, not in the prefix: its pidfile
    local pm=$OPENPBS_HOME/datastore/postmaster.pid pid
    if [ -f "$pm" ]; then
        pid=$(head -1 "$pm")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    fi
    if [ -f "$OPENPBS_CONF" ] && grep -q "^PBS_EXEC=$P\$" "$OPENPBS_CONF"; then rm -f "$OPENPBS_CONF"; fi
    if [ $PURGE = 1 ]; then rm -rf "$OPENPBS_HOME" "$OPENPBS_HOME"-pbsn[0-9]; fi
    say "OpenPBS stopped"
}

torque_down() {
    local P=$TORQUE
    [ -x "$P/sbin/pbs_server" ] || return 0
    if [ -n "$(prefix_pids "$P")" ]; then
        if timeout 10 "$P/bin/qstat" -B >/dev/null 2>&1; then
            timeout 20 "$P/bin/qdel" -p all >/dev/null 2>&1
            for _ in $(seq 100); do
                grep -q ' [QRHEWT] ' <<<"$(timeout 10 "$P/bin/qstat" 2>/dev/null)" || break
                sleep 0.1
            done
            timeout 20 "$P/bin/qterm" >/dev/null 2>&1
        fi
        local p
        for p in $(prefix_pids "$P/sbin/pbs_mom"); do kill -TERM "$p" 2>/dev/null; done
        timeout 10 "$P/sbin/trqauthd" -d >/dev/null 2>&1
        for _ in $(seq 50); do [ -z "$(prefix_pids "$P")" ] && break; sleep 0.1; done
        stop_prefix_pids "$P"
    fi
    rm -f /tmp/trqauthd-unix
    if [ $PURGE = 1 ]; then rm -rf "$TORQUE_HOME" "$TORQUE_HOME"-pbsn[0-9]; fi
    say "Torque stopped"
}

case $WHICH in
    openpbs) openpbs_down ;;
    torque) torque_down ;;
    all)
        openpbs_down
        torque_down
        ;;
esac
# The nodes and names are shared: remove them only when neither flavour runs.
if [ -z "$(prefix_pids "$OPENPBS")" ] && [ -z "$(prefix_pids "$TORQUE")" ]; then
    net_down
fi
exit 0
