# Shared by scripts/pbs-up.sh and scripts/pbs-down.sh (sourced, not run).
# OpenPBS and Torque use the same ports (15001-15004) and the same host
# alias, so only one of them runs at a time: bringing one up stops the other.

ROOT=${WSP_LRM_PREFIX:-/opt/wsp-lrm}
# The host name the servers and moms use: PBS ignores 127.0.0.0/8, so this
# alias (a tagged line in /etc/hosts, removed by pbs-down.sh) names a
# non-loopback address of this host.
PBS_HOSTNAME=${WSP_PBS_HOSTNAME:-pbshost}
HOSTS_TAG="# wsp-pbs (scripts/pbs-up.sh)"
# The service user that owns pilot jobs (root cannot submit on Torque, and
# root's jobs escape PBS's kill).
PBS_USER=${WSP_PBS_USER:-wsppilot}
# Seconds between qdel's SIGTERM and SIGKILL, set on the queue.
KILL_DELAY=${WSP_PBS_KILL_DELAY:-5}
# OpenPBS
OPENPBS=$ROOT/openpbs
OPENPBS_HOME=${WSP_OPENPBS_HOME:-/var/spool/wsp-openpbs}
OPENPBS_CONF=/etc/pbs.conf
OPENPBS_COMM_PORT=17101 # PBS's default 17001 is slurmd n1's
# Torque (its server home is compiled in: scripts/pbs-build.sh)
TORQUE=$ROOT/torque
TORQUE_HOME=/var/spool/wsp-torque

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { echo "$(basename "$0"): $*" >&2; }
die() {
    say "$*"
    exit 1
}

# bounded WHAT SECONDS COMMAND...: retries COMMAND until it succeeds.
bounded() {
    local what=$1 limit=$2 deadline
    shift 2
    deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.1
    done
}

# PIDs of processes whose executable lives under $1 (stray daemons, qsub's
# per-user helper): found by executable path, never by process name.
prefix_pids() {
    local p exe
    for p in /proc/[0-9]*; do
        exe=$(readlink "$p/exe" 2>/dev/null) || continue
        case "$exe" in "$1" | "$1"/*) echo "${p#/proc/}" ;; esac
    done
}

stop_prefix_pids() {
    local p
    for p in $(prefix_pids "$1"); do kill -TERM "$p" 2>/dev/null || true; done
    for _ in $(seq 30); do [ -z "$(prefix_pids "$1")" ] && return 0; sleep 0.1; done
    for p in $(prefix_pids "$1"); do kill -KILL "$p" 2>/dev/null || true; done
}

host_ip() {
    [ -n "${WSP_PBS_IP:-}" ] && { echo "$WSP_PBS_IP"; return 0; }
    ip -4 -o addr show scope global 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1
}

# /etc/hosts may be a bind mount: rewrite it in place, never replace the inode.
hosts_set() {
    local line=$1 rest
    grep -qxF "$line" /etc/hosts && return 0
    rest=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n%s\n' "$rest" "$line" >/etc/hosts
}

hosts_clear() {
    local rest
    grep -qF "$HOSTS_TAG" /etc/hosts || return 0
    rest=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
    printf '%s\n' "$rest" >/etc/hosts
}

ensure_user() {
    id "$PBS_USER" >/dev/null 2>&1 && return 0
    useradd --system --create-home --shell /bin/sh "$PBS_USER"
}

# Daemons started here must not inherit the descriptor of the system lock
# (flock /tmp/wsp-system.lock <cmd> passes it to <cmd>'s children): a daemon
# holding it keeps the lock taken for everyone after the command ends.
close_lock_fds() {
    local f n
    for f in /proc/$$/fd/*; do
        n=${f##*/}
        [ "$n" -gt 2 ] 2>/dev/null || continue
        [ "$(readlink "$f" 2>/dev/null)" = /tmp/wsp-system.lock ] && eval "exec $n>&-"
    done
    return 0
}
close_lock_fds
