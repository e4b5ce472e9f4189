#!/bin/bash
# Starts a real OpenPBS or Torque on this host for tests: server and
# scheduler on "pbshost" (this host's address on the bridge wsppbs0), and
# two execution hosts pbsn1 and pbsn2, each a mom in its own network and UTS
# namespace with its own address on that bridge (scripts/pbs-common.sh), a
# queue with kill_delay, job history, and the service user that owns pilot
# jobs. Idempotent: a server of the same flavour already up is kept (and
# re-configured); the other flavour is stopped first (both use ports
# 15001-15004 and the same names). Builds nothing (scripts/pbs-build.sh).
#
# usage: pbs-up.sh openpbs|torque
# Last line on stdout (for the tests):
#   export WSP_PBS_PREFIX=<prefix> WSP_PBS_USER=<user> WSP_PBS_NODES=<node,...>
#          WSP_PBS_SERVER_IP=<address the nodes reach this host at> WSP_PBS_STARTED=0|1
#   (plus PBS_CONF_FILE=/etc/pbs.conf for OpenPBS)
# WSP_PBS_STARTED=1: this call started the daemons (the caller stops them).
# Exit 2 when the flavour is not built.
# Env: WSP_LRM_PREFIX (/opt/wsp-lrm), WSP_PBS_USER (wsppilot),
#      WSP_PBS_KILL_DELAY (5), WSP_PBS_NET (10.79.0), WSP_PBS_NODE_COUNT (2),
#      WSP_PBS_WAIT_S (60).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/pbs-common.sh
. "$here/pbs-common.sh"
FLAVOUR=${1:-}
# What this run started is stopped again if the run fails (a server whose
# node never came up must not stay behind for the next test to trip on).
STARTED_NOW=0
stop_on_failure() {
    local rc=$?
    if [ "$rc" != 0 ] && [ "$STARTED_NOW" = 1 ]; then
        say "stopping what this run started ($FLAVOUR)"
        "$here/pbs-down.sh" "$FLAVOUR" >&2 || true
    fi
}
trap stop_on_failure EXIT
WAIT=${WSP_PBS_WAIT_S:-60}
[ "$(id -u)" = 0 ] || die "must run as root (the moms run jobs as their owners)"

setup_host() {
    net_up
    ensure_user
}

# wait_nodes_free PBSNODES_CMD...: every node reports "state = free".
wait_nodes_free() {
    local n home=$1
    for n in $(node_names); do
        bounded "node $n free" "$WAIT" sh -c "timeout 10 pbsnodes $n | grep -q 'state = free'" ||
            die "node $n not free after ${WAIT}s: $(timeout 10 pbsnodes "$n" 2>&1 | grep -E 'state|comment' | tr -s ' \n' ' '); see $home/mom_logs"
    done
}

# The nodes the server knows: exactly ours (earlier runs made "pbshost" one).
set_nodes() {
    local create_args=$1 n known
    known=$(timeout 10 pbsnodes -a 2>/dev/null | grep -E '^[^[:space:]]' | awk '{print $1}' || true)
    for n in $known; do
        grep -qx "$n" <<<"$(node_names)" || timeout 10 qmgr -c "delete node $n" >/dev/null
    done
    for n in $(node_names); do
        grep -qx "$n" <<<"$known" || timeout 10 qmgr -c "create node $n $create_args"
    done
}

# ---------------------------------------------------------------------------
openpbs_up() {
    local P=$OPENPBS started=0 n ns home
    [ -x "$P/sbin/pbs_server.bin" ] || { say "OpenPBS is not built in $P (scripts/pbs-build.sh openpbs)"; exit 2; }
    export PBS_CONF_FILE=$OPENPBS_CONF
    export PATH=$P/bin:$P/sbin:$PATH
    "$here/pbs-down.sh" torque >&2 || true
    setup_host
    case "$OPENPBS_HOME" in /tmp/* | /var/tmp/* | /dev/shm/*) die "WSP_OPENPBS_HOME=$OPENPBS_HOME: pbs_mom refuses a home below a world-writable folder" ;; esac
    # This host: server, scheduler, comm; no mom.
    cat >"$OPENPBS_CONF.wsp" <<EOF
PBS_SERVER=$PBS_HOSTNAME
PBS_SERVER_HOST_NAME=$PBS_HOSTNAME
PBS_LEAF_NAME=$PBS_HOSTNAME
PBS_LEAF_ROUTERS=$PBS_HOSTNAME:$OPENPBS_COMM_PORT
PBS_COMM_NAME=$PBS_HOSTNAME:$OPENPBS_COMM_PORT
PBS_START_SERVER=1
PBS_START_SCHED=1
PBS_START_COMM=1
PBS_START_MOM=0
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
    if timeout 10 qstat -B >/dev/null 2>&1 && "$P/libexec/pbs_init.d" status >/dev/null 2>&1; then
        say "OpenPBS server already up"
    else
        # The first start also initialises the datastore (PostgreSQL as user
        # postgres, port 15007) and creates queue workq.
        timeout 120 "$P/libexec/pbs_init.d" start 2>&1 | grep -v -e 'cannot modify limit' \
            -e 'Failed to protect PBS from Linux OOM' -e "cp: cannot stat '/usr/pgsql" -e pg_resetxlog >&2 || true
        started=1 STARTED_NOW=1
        bounded "pbs_server" "$WAIT" qstat -B || die "pbs_server did not come up; see $OPENPBS_HOME/server_logs"
    fi
    local q=(timeout 10 qmgr -c)
    "${q[@]}" "set server flatuid = True"
    "${q[@]}" "set server job_history_enable = True" # finished jobs: qstat -x (F, Exit_status)
    "${q[@]}" "set server scheduler_iteration = 1"
    "${q[@]}" "set queue workq kill_delay = $KILL_DELAY"
    set_nodes ""
    # Each execution host: its own pbs.conf (ip netns exec binds
    # /etc/netns/<ns>/pbs.conf over /etc/pbs.conf in the node's namespace,
    # for the mom and its jobs) and PBS_HOME, started by its own pbs_init.d.
    for n in $(node_names); do
        ns=$(node_ns "$n")
        home=$OPENPBS_HOME-$n
        mkdir -p "/etc/netns/$ns"
        cat >"/etc/netns/$ns/pbs.conf" <<EOF
PBS_SERVER=$PBS_HOSTNAME
PBS_MOM_NODE_NAME=$n
PBS_LEAF_NAME=$n
PBS_LEAF_ROUTERS=$PBS_HOSTNAME:$OPENPBS_COMM_PORT
PBS_START_SERVER=0
PBS_START_SCHED=0
PBS_START_COMM=0
PBS_START_MOM=1
PBS_EXEC=$P
PBS_HOME=$home
PBS_CORE_LIMIT=unlimited
PBS_SCP=/usr/bin/scp
EOF
        chmod 644 "/etc/netns/$ns/pbs.conf"
        if [ ! -f "$home/pbs_version" ]; then
            say "creating $home"
            mkdir -p "$home"
            in_node "$n" "$P/libexec/pbs_habitat" >/dev/null
        fi
        # Job output goes to <submit host>:<path> on the one file system here.
        grep -q '^\$usecp' "$home/mom_priv/config" || echo '$usecp *:/ /' >>"$home/mom_priv/config"
        # pbs_init.d status exits 0 whether or not the mom runs: read what it says.
        if ! grep -q '^pbs_mom is pid' <<<"$(in_node "$n" "$P/libexec/pbs_init.d" status 2>/dev/null)"; then
            in_node "$n" timeout 60 "$P/libexec/pbs_init.d" start 2>&1 | grep -v -e 'cannot modify limit' \
                -e 'Failed to protect PBS from Linux OOM' >&2 || true
            started=1 STARTED_NOW=1
        fi
    done
    wait_nodes_free "$OPENPBS_HOME-pbsn*"
    say "OpenPBS up: server on $PBS_HOSTNAME ($PBS_SERVER_IP), nodes $(node_names | paste -sd,), queue workq (kill_delay $KILL_DELAY s), jobs owned by $PBS_USER"
    echo "export WSP_PBS_PREFIX=$P WSP_PBS_USER=$PBS_USER WSP_PBS_NODES=$(node_names | paste -sd,) WSP_PBS_SERVER_IP=$PBS_SERVER_IP WSP_PBS_STARTED=$started PBS_CONF_FILE=$OPENPBS_CONF"
}

# ---------------------------------------------------------------------------
torque_up() {
    local P=$TORQUE started=0 first=0 n home lock
    [ -x "$P/sbin/pbs_server" ] || { say "Torque is not built in $P (scripts/pbs-build.sh torque)"; exit 2; }
    export PATH=$P/bin:$P/sbin:$PATH
    "$here/pbs-down.sh" openpbs >&2 || true
    setup_host
    [ -d "$P/share/server-home" ] || die "$P/share/server-home missing: rebuild (FORCE=1 scripts/pbs-build.sh torque)"
    if [ ! -d "$TORQUE_HOME/server_priv" ]; then
        cp -a "$P/share/server-home" "$TORQUE_HOME"
        first=1
    fi
    echo "$PBS_HOSTNAME" >"$TORQUE_HOME/server_name"
    if ! timeout 5 qstat -B >/dev/null 2>&1; then
        started=1 STARTED_NOW=1
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
    set_nodes np=2
    # Each execution host: a mom with its own home (-d), named after its node.
    for n in $(node_names); do
        home=$TORQUE_HOME-$n
        if [ ! -d "$home/mom_priv" ]; then
            mkdir -p "$home"
            for d in aux checkpoint mom_logs mom_priv spool undelivered pbs_environment; do
                cp -a "$P/share/server-home/$d" "$home/"
            done
        fi
        echo "$PBS_HOSTNAME" >"$home/server_name"
        printf '$pbsserver %s\n$usecp *:/ /\n$logevent 255\n' "$PBS_HOSTNAME" >"$home/mom_priv/config"
        lock=$home/mom_priv/mom.lock
        if ! { [ -s "$lock" ] && kill -0 "$(tr -d '\0' <"$lock")" 2>/dev/null; }; then
            in_node "$n" "$P/sbin/pbs_mom" -d "$home" -H "$n" >&2 || die "pbs_mom of $n did not start"
            started=1 STARTED_NOW=1
        fi
    done
    lock=$TORQUE_HOME/sched_priv/sched.lock
    if ! { [ -s "$lock" ] && kill -0 "$(tr -d '\0' <"$lock")" 2>/dev/null; }; then
        # pbs_sched binds the address of gethostname(), 127.0.0.1 here,
        # where the server cannot reach it; it has no -H: give it a UTS
        # namespace of its own named pbshost.
        unshare --uts sh -c "hostname $PBS_HOSTNAME && exec $P/sbin/pbs_sched" >&2 || die "pbs_sched did not start"
    fi
    wait_nodes_free "$TORQUE_HOME-pbsn*"
    say "Torque up: server on $PBS_HOSTNAME ($PBS_SERVER_IP), nodes $(node_names | paste -sd,), queue batch (kill_delay $KILL_DELAY s), jobs owned by $PBS_USER"
    echo "export WSP_PBS_PREFIX=$P WSP_PBS_USER=$PBS_USER WSP_PBS_NODES=$(node_names | paste -sd,) WSP_PBS_SERVER_IP=$PBS_SERVER_IP WSP_PBS_STARTED=$started"
}

case $FLAVOUR in
    openpbs) openpbs_up ;;
    torque) torque_up ;;
    *)
        echo "usage: $0 openpbs|torque" >&2
        exit 2
        ;;
esac
