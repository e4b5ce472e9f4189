# Shared by scripts/pbs-up.sh and scripts/pbs-down.sh (sourced, not run).
# OpenPBS and Torque use the same ports (15001-15004) and the same host
# alias, so only one of them runs at a time: bringing one up stops the other.

ROOT=${WSP_LRM_PREFIX:-/opt/wsp-lrm}
# The server's host name: PBS ignores 127.0.0.0/8, so this alias (a tagged
# line in /etc/hosts, removed by pbs-down.sh) names the address this host
# has on the bridge below.
PBS_HOSTNAME=${WSP_PBS_HOSTNAME:-pbshost}
HOSTS_TAG="# wsp-pbs (scripts/pbs-up.sh)"
# The execution hosts pbsn1..pbsnN: each mom runs in a network namespace of
# its own (wsp-pbsnI, address <net>.(10+I) on a veth into the bridge) and a
# UTS namespace named after it, so the server sees N hosts, pbsdsh spans
# them, and a job's processes see their node's name and address. The server,
# scheduler and clients stay in this host's namespaces, at <net>.1.
PBS_NET=${WSP_PBS_NET:-10.79.0} # a /24 nothing else on this host uses
PBS_BRIDGE=wsppbs0
PBS_SERVER_IP=$PBS_NET.1
PBS_NODE_COUNT=${WSP_PBS_NODE_COUNT:-2}
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

# /etc/hosts may be a bind mount: rewrite it in place, never replace the
# inode. Each edit holds a lock for its read-modify-write: two runs editing
# at once (an up beside a down) once left the file empty, and with it the
# host's own name, which Slurm and Grid Engine need.
HOSTS_LOCK=/run/wsp-hosts.lock

# Sets the tagged lines to exactly the arguments.
hosts_set() {
    local want
    want=$(printf '%s\n' "$@")
    (
        flock -w 30 9 || die "$HOSTS_LOCK: held by another edit of /etc/hosts for 30 s"
        [ "$(grep -F "$HOSTS_TAG" /etc/hosts || true)" = "$want" ] && exit 0
        rest=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
        printf '%s\n%s\n' "$rest" "$want" >/etc/hosts
    ) 9>"$HOSTS_LOCK"
}

hosts_clear() {
    (
        flock -w 30 9 || die "$HOSTS_LOCK: held by another edit of /etc/hosts for 30 s"
        grep -qF "$HOSTS_TAG" /etc/hosts || exit 0
        rest=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
        printf '%s\n' "$rest" >/etc/hosts
    ) 9>"$HOSTS_LOCK"
}

node_names() {
    local i
    for i in $(seq "$PBS_NODE_COUNT"); do echo "pbsn$i"; done
}
node_ip() { echo "$PBS_NET.$((10 + ${1#pbsn}))"; }
node_ns() { echo "wsp-$1"; }

# The bridge, one namespace per node, their addresses and /etc/hosts names
# (idempotent).
net_up() {
    local n ns ip other
    case $PBS_NODE_COUNT in [1-9]) ;; *) die "WSP_PBS_NODE_COUNT=$PBS_NODE_COUNT: 1 to 9 nodes" ;; esac
    other=$(ip -4 -o addr show 2>/dev/null | awk -v b="$PBS_BRIDGE" -v net="$PBS_NET." '$2 != b && index($4, net) == 1 {print $2}' | sed -n 1p)
    [ -z "$other" ] || die "$PBS_NET.0/24 is already on $other: choose another with WSP_PBS_NET"
    if ! ip link show "$PBS_BRIDGE" >/dev/null 2>&1; then
        ip link add "$PBS_BRIDGE" type bridge
        ip link set "$PBS_BRIDGE" type bridge stp_state 0 forward_delay 0
    fi
    ip addr replace "$PBS_SERVER_IP/24" dev "$PBS_BRIDGE"
    ip link set "$PBS_BRIDGE" up
    local hosts=("$PBS_SERVER_IP $PBS_HOSTNAME $HOSTS_TAG")
    for n in $(node_names); do
        ns=$(node_ns "$n")
        ip=$(node_ip "$n")
        grep -q "^$ns\b" <<<"$(ip netns list)" || ip netns add "$ns"
        if ! ip link show "$ns" >/dev/null 2>&1; then
            ip link add "$ns" type veth peer name eth0 netns "$ns"
        fi
        ip link set "$ns" master "$PBS_BRIDGE" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$ip/24" dev eth0
        ip -n "$ns" link set eth0 up
        hosts+=("$ip $n $HOSTS_TAG")
    done
    hosts_set "${hosts[@]}"
    grep -q "^$PBS_SERVER_IP " <<<"$(getent ahostsv4 "$PBS_HOSTNAME")" || die "$PBS_HOSTNAME does not resolve to $PBS_SERVER_IP"
}

# Undoes net_up: every process left in a node's namespace (only jobs of the
# moms started here can be there) is stopped, then the namespaces, the
# bridge and the names go.
net_down() {
    local ns p
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^wsp-pbsn[0-9]$'); do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -TERM "$p" 2>/dev/null || true; done
        for _ in $(seq 30); do [ -z "$(ip netns pids "$ns" 2>/dev/null)" ] && break; sleep 0.1; done
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    rmdir /etc/netns 2>/dev/null || true # only when empty
    ip link del "$PBS_BRIDGE" 2>/dev/null || true
    hosts_clear
}

# in_node NODE COMMAND...: runs COMMAND on NODE (its network namespace,
# and a UTS namespace whose host name is NODE).
in_node() {
    local n=$1
    shift
    ip netns exec "$(node_ns "$n")" unshare --uts /bin/sh -c 'hostname "$0" && exec "$@"' "$n" "$@"
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
