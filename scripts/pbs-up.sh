#!/bin/bash
# Starts a real OpenPBS or Torque on this host for tests: server, scheduler
# and one mom on the node "pbshost" (an /etc/hosts alias of this host's
# non-loopback address), queue with kill_delay, job history, and the service
# user that owns pilot jobs. Idempotent: a server of the same flavour already
# up is kept (and re-configured); the other flavour is stopped first (both
# use ports 15001-15004). Builds nothing (scripts/pbs-build.sh).
#
# usage: pbs-up.sh openpbs|torque
# Last line on stdout (for the tests):
#   export WSP_PBS_PREFIX=<prefix> WSP_PBS_USER=<user> WSP_PBS_NODES=<node,...> WSP_PBS_STARTED=0|1
#   (plus PBS_CONF_FILE=/etc/pbs.conf for OpenPBS)
# WSP_PBS_STARTED=1: this call started the daemons (the caller stops them).
# Exit 2 when the flavour is not built.
# Env: WSP_LRM_PREFIX (/opt/wsp-lrm), WSP_PBS_USER (wsppilot),
#      WSP_PBS_KILL_DELAY (5), WSP_PBS_IP (first global IPv4), WSP_PBS_WAIT_S (60).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/pbs-common.sh
. "$here/pbs-common.sh"
FLAVOUR=${1:-}
WAIT=${WSP_PBS_WAIT_S:-60}
[ "$(id -u)" = 0 ] || die "must run as root (the moms run jobs as their owners)"

setup_host() {
    local ip
    ip=$(host_ip)
    [ -n "$ip" ] || die "no non-loopback IPv4 address: PBS ignores 127.0.0.0/8 (set WSP_PBS_IP)"
    hosts_set "$ip $PBS_HOSTNAME $HOSTS_TAG"
    getent ahostsv4 "$PBS_HOSTNAME" | grep -q "^$ip " || die "$PBS_HOSTNAME does not resolve to $ip"
    ensure_user
}

# ---------------------------------------------------------------------------
openpbs_up() {
    local P=$OPENPBS started=0
    [ -x "$P/sbin/pbs_server.bin" ] || { say "OpenPBS is not built in $P (scripts/pbs-build.sh openpbs)"; exit 2; }
    export PBS_CONF_FILE=$OPENPBS_CONF
    export PATH=$P/bin:$P/sbin:$PATH
    "$here/pbs-down.sh" torque >&2 || true
    setup_host
    case "$OPENPBS_HOME" in /tmp/* | /var/tmp/* | /dev/shm/*) die "WSP_OPENPBS_HOME=$OPENPBS_HOME: pbs_mom refuses a home below a world-writable folder" ;; esac
    cat >"$OPENPBS_CONF.wsp" <<EOF
PBS_SERVER=$PBS_HOSTNAME
PBS_SERVER_HOST_NAME=$PBS_HOSTNAME
PBS_LEAF_NAME=$PBS_HOSTNAME
PBS_MOM_NODE_NAME=$PBS_HOSTNAME
PBS_LEAF_ROUTERS=$PBS_HOSTNAME:$OPENPBS_COMM_PORT
PBS_COMM_NAME=$PBS_HOSTNAME:$OPENPBS_COMM_PORT
PBS_START_SERVER=1
PBS_START_SCHED=1
PBS_START_COMM=1
PBS_START_MOM=1
PBS_EXEC=$P
PBS_HOME=$OPENPBS_HOME
PBS_CORE_LIMIT=unlimited
PBS_SCP=/usr/bin/scp
EOF
    if cmp -s "$OPENPBS_CONF.wsp" "$OPENPBS_CONF"; then rm -f "$OPENPBS_CONF.wsp"; else mv "$OPENPBS_CONF.wsp" "$OPENPBS_CONF"; chmod 644 "$OPENPBS_CONF"; fi
    if [ ! -d "$OPENPBS_HOME/server_priv" ]; then
        say "creating $OPENPBS_HOME"
        "$P/libexec/pbs_postinstall" server "$("$P/bin/qstat" --version | awk '{print $NF}')" \
            "$P" "$OPENPBS_HOME" postgres sameconf >/dev/null
    fi
    # Job output files go to <submit host>:<path>; the mom's own name here is
    # "localhost", so without this it would scp them to itself and hang in E.
    grep -q '^\$usecp' "$OPENPBS_HOME/mom_priv/config" || echo '$usecp *:/ /' >>"$OPENPBS_HOME/mom_priv/config"
    if timeout 10 qstat -B >/dev/null 2>&1 && "$P/libexec/pbs_init.d" status >/dev/null 2>&1; then
        say "OpenPBS already up"
    else
        # The first start also initialises the datastore (PostgreSQL as user
        # postgres, port 15007) and creates queue workq and the local node.
        timeout 120 "$P/libexec/pbs_init.d" start 2>&1 | grep -v -e 'cannot modify limit' \
            -e 'Failed to protect PBS from Linux OOM' -e "cp: cannot stat '/usr/pgsql" -e pg_resetxlog >&2 || true
        started=1
        bounded "pbs_server" "$WAIT" qstat -B || die "pbs_server did not come up; see $OPENPBS_HOME/server_logs"
    fi
    local q=(timeout 10 qmgr -c)
    "${q[@]}" "set server flatuid = True"
    "${q[@]}" "set server job_history_enable = True" # finished jobs: qstat -x (F, Exit_status)
    "${q[@]}" "set server scheduler_iteration = 1"
    "${q[@]}" "set queue workq kill_delay = $KILL_DELAY"
    timeout 10 pbsnodes "$PBS_HOSTNAME" >/dev/null 2>&1 || "${q[@]}" "create node $PBS_HOSTNAME"
    bounded "node free" "$WAIT" sh -c "timeout 10 pbsnodes $PBS_HOSTNAME | grep -q 'state = free'" ||
        die "node $PBS_HOSTNAME not free after ${WAIT}s; see $OPENPBS_HOME/mom_logs"
    say "OpenPBS up: server and node $PBS_HOSTNAME, queue workq (kill_delay $KILL_DELAY s), jobs owned by $PBS_USER"
    echo "export WSP_PBS_PREFIX=$P WSP_PBS_USER=$PBS_USER WSP_PBS_NODES=$PBS_HOSTNAME WSP_PBS_STARTED=$started PBS_CONF_FILE=$OPENPBS_CONF"
}

# ---------------------------------------------------------------------------
torque_up() {
    local P=$TORQUE started=0 first=0
    [ -x "$P/sbin/pbs_server" ] || { say "Torque is not built in $P (scripts/pbs-build.sh torque)"; exit 2; }
    export PATH=$P/bin:$P/sbin:$PATH
    "$here/pbs-down.sh" openpbs >&2 || true
    setup_host
    if [ ! -d "$TORQUE_HOME/server_priv" ]; then
        [ -d "$P/share/server-home" ] || die "$P/share/server-home missing: rebuild (FORCE=1 scripts/pbs-build.sh torque)"
        cp -a "$P/share/server-home" "$TORQUE_HOME"
        first=1
    fi
    echo "$PBS_HOSTNAME" >"$TORQUE_HOME/server_name"
    printf '$pbsserver %s\n$usecp *:/ /\n$logevent 255\n' "$PBS_HOSTNAME" >"$TORQUE_HOME/mom_priv/config"
    if ! timeout 5 qstat -B >/dev/null 2>&1; then
        started=1
        # trqauthd authenticates clients to the server (socket /tmp/trqauthd-unix)
        if [ -z "$(prefix_pids "$P/sbin/trqauthd")" ]; then
            rm -f /tmp/trqauthd-unix
            "$P/sbin/trqauthd" >&2 || die "trqauthd did not start"
        fi
        if [ $first = 1 ] || [ ! -f "$TORQUE_HOME/server_priv/serverdb" ]; then
            # -t create asks before it wipes a database: there is none.
            echo y | "$P/sbin/pbs_server" -t create -H "$PBS_HOSTNAME" >&2 || die "pbs_server -t create failed"
        else
            "$P/sbin/pbs_server" -H "$PBS_HOSTNAME" >&2 || die "pbs_server did not start"
        fi
        bounded "pbs_server" "$WAIT" qstat -B || die "pbs_server did not come up; see $TORQUE_HOME/server_logs"
    else
        say "Torque server already up"
    fi
    local q=(timeout 10 qmgr -c)
    "${q[@]}" "list queue batch" >/dev/null 2>&1 || "${q[@]}" "create queue batch queue_type=execution"
    "${q[@]}" "set queue batch started = True"
    "${q[@]}" "set queue batch enabled = True"
    "${q[@]}" "set queue batch kill_delay = $KILL_DELAY"
    "${q[@]}" "set server default_queue = batch"
    "${q[@]}" "set server scheduling = True"
    "${q[@]}" "set server keep_completed = 300"
    "${q[@]}" "set server scheduler_iteration = 1"
    # qsub from this host as a normal user ("ruserok failed validating" else)
    "${q[@]}" "set server submit_hosts = $(hostname)"
    "${q[@]}" "set server submit_hosts += $PBS_HOSTNAME"
    "${q[@]}" "set server submit_hosts += localhost"
    timeout 10 pbsnodes "$PBS_HOSTNAME" >/dev/null 2>&1 || "${q[@]}" "create node $PBS_HOSTNAME np=2"
    local lock
    lock=$TORQUE_HOME/mom_priv/mom.lock
    if ! { [ -s "$lock" ] && kill -0 "$(cat "$lock")" 2>/dev/null; }; then
        # -H: the mom reports as pbshost, not as this host's own name
        "$P/sbin/pbs_mom" -H "$PBS_HOSTNAME" >&2 || die "pbs_mom did not start"
    fi
    lock=$TORQUE_HOME/sched_priv/sched.lock
    if ! { [ -s "$lock" ] && kill -0 "$(cat "$lock")" 2>/dev/null; }; then
        # pbs_sched binds the address of gethostname(), 127.0.0.1 here,
        # where the server cannot reach it; it has no -H: give it a UTS
        # namespace of its own named pbshost.
        unshare --uts sh -c "hostname $PBS_HOSTNAME && exec $P/sbin/pbs_sched" >&2 || die "pbs_sched did not start"
    fi
    bounded "node free" "$WAIT" sh -c "timeout 10 pbsnodes $PBS_HOSTNAME | grep -q 'state = free'" ||
        die "node $PBS_HOSTNAME not free after ${WAIT}s; see $TORQUE_HOME/mom_logs"
    say "Torque up: server and node $PBS_HOSTNAME, queue batch (kill_delay $KILL_DELAY s), jobs owned by $PBS_USER"
    echo "export WSP_PBS_PREFIX=$P WSP_PBS_USER=$PBS_USER WSP_PBS_NODES=$PBS_HOSTNAME WSP_PBS_STARTED=$started"
}

case $FLAVOUR in
    openpbs) openpbs_up ;;
    torque) torque_up ;;
    *)
        echo "usage: $0 openpbs|torque" >&2
        exit 2
        ;;
esac
