#!/usr/bin/env bash
# Simulated multi-node cluster on one machine (shared/DESIGN.md section 5): one network namespace per
# rank (i4d0 .. i4dN-1), each joined by a veth pair to a bridge in the root namespace, which sits on
# the bridge too (so the PMIx server in mpirun can reach the ranks). Every rank's link is shaped in
# both directions with tbf (the veth end inside the namespace, and the bridge-side end), like one NIC
# per node on a switch; an optional netem delay is added on the namespace side only, so the one-way
# rank-to-rank latency is --delay and the round trip is twice that.
#
# --ranks-per-node K (default 1) makes nodes of K ranks: N/K namespaces (i4d0 .. i4d(N/K-1)), each
# with one shaped link shared by its K ranks. mpirun then starts one Open MPI daemon per node
# inside its namespace, under its own host name i4dn<j> (launch/netns_rsh.sh is mpirun's remote
# shell: `ip netns exec` plus a UTS namespace), so Open MPI sees N/K hosts: MPI_COMM_TYPE_SHARED
# groups the ranks of a node, and ranks of one node talk through shared memory (btl vader) while
# ranks of different nodes use TCP over the shaped links.
#
# Invariant: this script only ever deletes objects it recorded in its state file when it made them
# ($STATE_DIR/<prefix>.state), and refuses to start if a name it would create already exists.
#
#   launch/netns_cluster.sh up     --ranks N --rate R [--ranks-per-node K] [--delay D] [--burst B]
#   launch/netns_cluster.sh down
#   launch/netns_cluster.sh status
#   launch/netns_cluster.sh run    --ranks N --rate R [--ranks-per-node K] [--delay D] [--burst B]
#                                  [--keep] -- CMD...
#   launch/netns_cluster.sh mpirun --ranks N --rate R [--ranks-per-node K] [--delay D] [--burst B]
#                                  [--keep] -- [MPIRUN_OPTS... --] PROG ARGS...
#   launch/netns_cluster.sh mpirun-cmd --ranks N [--ranks-per-node K] -- [MPIRUN_OPTS... --] PROG ARGS...
#
# `run` and `mpirun` bring the cluster up unless it is already up with the same settings, and tear it
# down afterwards (also on failure or Ctrl-C) if they brought it up, unless --keep. `mpirun-cmd`
# prints the mpirun command line without running anything. Only one run/mpirun/up/down at a time:
# they take a lock, so two benchmarks never share the shaped links (commands started inside `run`
# inherit the lock). Needs root, iproute2 (ip, tc) and a kernel with netns, veth, bridge and tbf.
#
# Environment: INT4DDP_NETNS_PREFIX (default i4d, names i4d0.., i4dbr0, i4dv0..),
# INT4DDP_NETNS_SUBNET (default 10.213.0.0/24; must be a /24 that collides with nothing here),
# INT4DDP_BUILD (build dir; a PROG of `int4ddp` means $INT4DDP_BUILD/int4ddp, default build/),
# INT4DDP_NETNS_COUNTERS (a file: `run` and `mpirun` also write the link counter JSON line there).
#
# Link counters: `run` and `mpirun` read every namespace's interface counters (tx/rx bytes and
# packets of the veth end inside it, so Ethernet, IP and TCP headers, ACKs, retransmissions and the
# PMIx/start-up traffic are all included) before and after the command, and print the differences
# on stderr as a per-rank table and one JSON line
#   {"netns_bytes":[{"rank":r,"tx":B,"rx":B,"tx_packets":P,"rx_packets":P},...]}
# (with --ranks-per-node K > 1, one entry per node, "node":j instead of "rank":r; traffic between
# the ranks of one node does not cross the link and is not counted)
# (also on failure of the command, as long as the counters could be read). veth passes GSO
# super-packets whole, so a packet here can carry up to 64 KiB and one set of headers.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
INT4DDP_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
PREFIX="${INT4DDP_NETNS_PREFIX:-i4d}"
SUBNET="${INT4DDP_NETNS_SUBNET:-10.213.0.0/24}"
STATE_DIR="${INT4DDP_NETNS_STATE_DIR:-/run/int4ddp-netns}"
STATE_FILE="$STATE_DIR/$PREFIX.state"
LOCK_FILE="$STATE_DIR/$PREFIX.lock"
BRIDGE="${PREFIX}br0"
WRAPPER="$LAUNCH_DIR/netns_exec.sh"
kMaxRanks=253              # .1 .. .253 for ranks, .254 for the root namespace on the bridge
kQueueLatency=50ms         # tbf: longest a packet may wait in the shaper queue (sets its limit)
kMinBurstBytes=65536       # tbf bucket never below one 64 KiB GSO super-packet
kBurstSeconds=0.002        # default bucket = 2 ms of traffic at the link rate

die() { echo "netns_cluster: error: $*" >&2; exit 1; }
log() { echo "netns_cluster: $*" >&2; }

usage() {
    sed -n '/^#   launch/,/^#$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

# ---------------------------------------------------------------------------------------------------
# Checks

require_tools() {
    local missing=() t
    for t in ip tc flock; do
        command -v "$t" >/dev/null 2>&1 || missing+=("$t")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing ${missing[*]}; install iproute2 and util-linux"
    log "installing iproute2 util-linux (missing: ${missing[*]})"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux
}

require_root() {
    [ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, veth, tc); run it with sudo"
}

# A throwaway namespace proves the kernel and container allow what `up` will do.
probe_kernel() {
    local probe="${PREFIX}probe$$"
    ip netns add "$probe" 2>/dev/null ||
        die "cannot create a network namespace (kernel without CONFIG_NET_NS, or a container without CAP_SYS_ADMIN)"
    if ! ip -n "$probe" link add "${PREFIX}pa" type veth peer name "${PREFIX}pb" 2>/dev/null; then
        ip netns del "$probe"
        die "cannot create veth pairs (CONFIG_VETH missing?)"
    fi
    if ! ip -n "$probe" link add "${PREFIX}pbr" type bridge 2>/dev/null; then
        ip netns del "$probe"
        die "cannot create a bridge (CONFIG_BRIDGE missing?)"
    fi
    if ! tc -n "$probe" qdisc add dev "${PREFIX}pa" root tbf rate 1gbit burst 64kb latency 50ms \
        2>/dev/null; then
        ip netns del "$probe"
        die "tc tbf not available (CONFIG_NET_SCH_TBF / sch_tbf module missing?)"
    fi
    if [ -n "$DELAY" ] && ! tc -n "$probe" qdisc add dev "${PREFIX}pb" root netem delay "$DELAY" \
        2>/dev/null; then
        ip netns del "$probe"
        die "tc netem not available or bad --delay '$DELAY' (CONFIG_NET_SCH_NETEM?)"
    fi
    ip netns del "$probe"
}

# awk reads all of `ip netns list` (grep -q could end it with SIGPIPE, which pipefail reports).
ns_exists() { ip netns list | awk -v n="$1" '$1 == n { f = 1 } END { exit !f }'; }

ip_to_int() {
    local a b c d
    IFS=. read -r a b c d <<<"$1"
    echo $(((a << 24) | (b << 16) | (c << 8) | d))
}

# Does CIDR $1 overlap CIDR $2?
cidr_overlap() {
    local n1="${1%/*}" l1="${1#*/}" n2="${2%/*}" l2="${2#*/}"
    [ "$l1" = "$1" ] && l1=32
    [ "$l2" = "$2" ] && l2=32
    local l=$((l1 < l2 ? l1 : l2))
    local mask=$(((0xffffffff << (32 - l)) & 0xffffffff))
    [ $(($(ip_to_int "$n1") & mask)) -eq $(($(ip_to_int "$n2") & mask)) ]
}

check_subnet() {
    [[ "$SUBNET" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)\.0/24$ ]] ||
        die "INT4DDP_NETNS_SUBNET must be a /24 like 10.213.0.0/24 (got '$SUBNET')"
    local net dev rest
    # Any address or route in the root namespace that overlaps, except on our own bridge.
    while read -r net dev rest; do
        [ "$dev" = "$BRIDGE" ] && continue
        cidr_overlap "$net" "$SUBNET" && die "subnet $SUBNET collides with $net on $dev; set INT4DDP_NETNS_SUBNET"
    done < <(ip -4 -o addr show | awk '{print $4, $2}'
             ip -4 route show table all type unicast | awk '$1 != "default" {
                 d = ""; for (i = 2; i < NF; i++) if ($i == "dev") d = $(i + 1); print $1, d }')
    return 0
}

# ---------------------------------------------------------------------------------------------------
# Settings

RANKS="" RATE="" DELAY="" BURST="" KEEP=0 RPN=1 NODES=""

parse_cluster_opts() {  # sets RANKS RATE DELAY BURST KEEP RPN; leaves the rest in REST
    REST=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --ranks|-n) RANKS="${2:?--ranks needs a value}"; shift 2 ;;
            --rate) RATE="${2:?--rate needs a value}"; shift 2 ;;
            --ranks-per-node) RPN="${2:?--ranks-per-node needs a value}"; shift 2 ;;
            --delay) DELAY="${2:?--delay needs a value}"; shift 2 ;;
            --burst) BURST="${2:?--burst needs a value}"; shift 2 ;;
            --keep) KEEP=1; shift ;;
            -h|--help) usage 0 ;;
            --) shift; REST=("$@"); return 0 ;;
            *) die "unknown option '$1' (the command goes after --)" ;;
        esac
    done
}

validate_settings() {
    [[ "$PREFIX" =~ ^[a-z][a-z0-9]{0,7}$ ]] ||  # interface names: prefix + "v253" <= 15 chars
        die "INT4DDP_NETNS_PREFIX must be 1-8 lowercase letters/digits (got '$PREFIX')"
    if ! [[ "$RANKS" =~ ^[0-9]+$ ]] || [ "$RANKS" -lt 1 ] || [ "$RANKS" -gt $kMaxRanks ]; then
        die "--ranks must be 1..$kMaxRanks (got '${RANKS}')"
    fi
    if ! [[ "$RPN" =~ ^[0-9]+$ ]] || [ "$RPN" -lt 1 ] || [ $((RANKS % RPN)) -ne 0 ]; then
        die "--ranks-per-node must divide --ranks $RANKS (got '${RPN}')"
    fi
    NODES=$((RANKS / RPN))  # namespaces: one per node (one per rank with the default K = 1)
    [[ "$RATE" =~ ^[0-9]+(\.[0-9]+)?(bit|kbit|mbit|gbit|tbit)$ ]] ||
        die "--rate must be like 100mbit, 1gbit or 10gbit (got '${RATE}')"
    [ -z "$DELAY" ] || [[ "$DELAY" =~ ^[0-9]+(\.[0-9]+)?(us|ms|s)$ ]] ||
        die "--delay must be like 100us or 1ms (got '$DELAY')"
    [ -z "$BURST" ] || [[ "$BURST" =~ ^[0-9]+(b|kb|mb)?$ ]] ||
        die "--burst must be bytes like 256kb or 2mb (got '$BURST')"
    if [ -z "$BURST" ]; then
        BURST="$(awk -v r="$RATE" -v s="$kBurstSeconds" -v m="$kMinBurstBytes" 'BEGIN {
            n = r + 0; u = r; sub(/^[0-9.]+/, "", u)
            f = (u == "tbit") ? 1e12 : (u == "gbit") ? 1e9 : (u == "mbit") ? 1e6 : (u == "kbit") ? 1e3 : 1
            b = int(n * f / 8 * s); if (b < m) b = m; print b "b" }')"
    fi
}

state_get() {  # state_get KEY: value from the state file, empty if none
    [ -f "$STATE_FILE" ] || return 0
    sed -n "s/^$1=//p" "$STATE_FILE" | tail -n 1
}

record() { echo "$1" >>"$STATE_FILE"; }  # record "obj=KIND NAME" as soon as it exists

is_up_with_settings() {
    [ -f "$STATE_FILE" ] && [ "$(state_get complete)" = 1 ] &&
        [ "$(state_get ranks)" = "$RANKS" ] && [ "$(state_get rate)" = "$RATE" ] &&
        [ "$(state_get ranks_per_node)" = "$RPN" ] &&
        [ "$(state_get delay)" = "$DELAY" ] && [ "$(state_get burst)" = "$BURST" ] &&
        [ "$(state_get subnet)" = "$SUBNET" ] && ip link show "$BRIDGE" >/dev/null 2>&1 &&
        ns_exists "${PREFIX}$((NODES - 1))"
}

# ---------------------------------------------------------------------------------------------------
# Locking: one cluster operation at a time; children of `run` inherit the lock through the env.

take_lock() {
    [ "${INT4DDP_NETNS_LOCKED:-}" = "$PREFIX" ] && return 0
    mkdir -p "$STATE_DIR"
    exec 9>>"$LOCK_FILE"
    if ! flock -n 9; then
        log "waiting for another netns_cluster.sh holding $LOCK_FILE"
        flock 9
    fi
    export INT4DDP_NETNS_LOCKED="$PREFIX"
}

# ---------------------------------------------------------------------------------------------------
# up / down

addr_of_rank() { echo "${SUBNET%.0/24}.$(($1 + 1))"; }

shape() {  # shape NETNS_OR_EMPTY DEV WITH_DELAY
    local ns_args=() dev="$2"
    [ -n "$1" ] && ns_args=(-n "$1")
    if [ "$3" = 1 ] && [ -n "$DELAY" ]; then
        # netem at the root delays, tbf below it shapes (the tc-netem man page's recipe).
        tc "${ns_args[@]}" qdisc add dev "$dev" root handle 1: netem delay "$DELAY" limit 100000
        tc "${ns_args[@]}" qdisc add dev "$dev" parent 1:1 handle 10: \
            tbf rate "$RATE" burst "$BURST" latency "$kQueueLatency"
    else
        tc "${ns_args[@]}" qdisc add dev "$dev" root tbf rate "$RATE" burst "$BURST" \
            latency "$kQueueLatency"
    fi
}

cluster_up() {
    local r ns host peer
    for ((r = 0; r < NODES; r++)); do
        ! ns_exists "${PREFIX}$r" ||
            die "namespace ${PREFIX}$r exists but is not ours; remove it or set INT4DDP_NETNS_PREFIX"
        ! ip link show "${PREFIX}v$r" >/dev/null 2>&1 ||
            die "interface ${PREFIX}v$r exists but is not ours"
        ! ip link show "${PREFIX}p$r" >/dev/null 2>&1 ||
            die "interface ${PREFIX}p$r exists but is not ours"
    done
    ! ip link show "$BRIDGE" >/dev/null 2>&1 || die "bridge $BRIDGE exists but is not ours"

    {
        echo "ranks=$RANKS"; echo "ranks_per_node=$RPN"; echo "nodes=$NODES"; echo "rate=$RATE"; echo "delay=$DELAY"; echo "burst=$BURST"
        echo "subnet=$SUBNET"; echo "complete=0"
    } >"$STATE_FILE"
    # Any failure from here on exits (set -e); the EXIT trap removes what was already made.
    trap 'log "bring-up failed; tearing down what was made"; cluster_down' EXIT

    ip link add "$BRIDGE" type bridge
    record "obj=link $BRIDGE"
    ip addr add "${SUBNET%.0/24}.254/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up

    for ((r = 0; r < NODES; r++)); do
        ns="${PREFIX}$r" host="${PREFIX}v$r" peer="${PREFIX}p$r"
        ip netns add "$ns"
        record "obj=netns $ns"
        ip link add "$host" type veth peer name "$peer"
        record "obj=link $host"
        ip link set "$peer" netns "$ns"
        ip link set "$host" master "$BRIDGE"
        ip link set "$host" up
        ip -n "$ns" addr add "$(addr_of_rank "$r")/24" dev "$peer"
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$peer" up
        shape "$ns" "$peer" 1   # rank -> switch
        shape "" "$host" 0      # switch -> rank
    done
    trap - EXIT
    sed -i 's/^complete=0$/complete=1/' "$STATE_FILE"
    log "up: $RANKS ranks ($NODES node(s) of $RPN) on $SUBNET (root ${SUBNET%.0/24}.254 on $BRIDGE), rate $RATE," \
        "burst $BURST${DELAY:+, delay $DELAY}"
}

# Deletes what the state file lists, newest first; safe to run twice or after a partial bring-up.
cluster_down() {
    if [ ! -f "$STATE_FILE" ]; then
        log "down: no cluster recorded in $STATE_FILE; nothing to do"
        return 0
    fi
    local kind name
    while read -r kind name; do
        case "$kind" in
            netns) ip netns del "$name" 2>/dev/null || true ;;   # takes its veth end with it
            link) ! ip link show "$name" >/dev/null 2>&1 || ip link del "$name" ;;
        esac
    done < <(sed -n 's/^obj=//p' "$STATE_FILE" | tac)
    rm -f "$STATE_FILE"
    log "down: removed"
}

cluster_status() {
    if [ ! -f "$STATE_FILE" ]; then
        echo "no cluster (no $STATE_FILE)"
        return 1
    fi
    local ranks nodes r ns
    ranks="$(state_get ranks)"
    nodes="$(state_get nodes)"
    nodes="${nodes:-$ranks}"
    echo "ranks=$ranks nodes=$nodes rate=$(state_get rate) burst=$(state_get burst)" \
        "delay=$(state_get delay) subnet=$(state_get subnet) complete=$(state_get complete)"
    ip -br addr show dev "$BRIDGE" 2>/dev/null || echo "$BRIDGE missing"
    for ((r = 0; r < nodes; r++)); do
        ns="${PREFIX}$r"
        if ! ns_exists "$ns"; then
            echo "$ns missing"
            continue
        fi
        echo "$ns: $(ip -n "$ns" -br -4 addr show dev "${PREFIX}p$r" | awk '{print $3}')" \
            "out: $(tc -n "$ns" qdisc show dev "${PREFIX}p$r" | grep -o 'tbf.*' | head -n 1)"
        echo "    in: $(tc qdisc show dev "${PREFIX}v$r" | grep -o 'tbf.*' | head -n 1)"
    done
}

# Brings the cluster up for run/mpirun; sets BROUGHT_UP=1 when the caller must tear it down.
ensure_up() {
    BROUGHT_UP=0
    if is_up_with_settings; then
        log "already up with these settings; leaving it up afterwards"
        return 0
    fi
    if [ -f "$STATE_FILE" ]; then
        log "up with other settings; replacing it"
        cluster_down
    fi
    cluster_up
    BROUGHT_UP=1
}

# ---------------------------------------------------------------------------------------------------
# mpirun on the cluster

resolve_prog() {  # `int4ddp` means the built binary unless one is on PATH
    if [ "$1" = int4ddp ] && ! command -v int4ddp >/dev/null 2>&1; then
        local bin="${INT4DDP_BUILD:-$INT4DDP_ROOT/build}/int4ddp"
        [ -x "$bin" ] || die "$bin not found; build first (launch/run.sh or cmake --build build)"
        echo "$bin"
    else
        echo "$1"
    fi
}

# mpirun_cmd ARGS: fills MPI_CMD. ARGS = [MPIRUN_OPTS... --] PROG ARGS (MPIRUN_OPTS start with '-').
mpirun_cmd() {
    local extra=()
    if [ $# -gt 0 ] && [[ "$1" == -* ]]; then
        while [ $# -gt 0 ] && [ "$1" != -- ]; do
            extra+=("$1")
            shift
        done
        [ $# -gt 0 ] || die "mpirun options must end with -- before the program"
        shift
    fi
    [ $# -gt 0 ] || die "no program given after --"
    local prog
    prog="$(resolve_prog "$1")"
    shift
    MPI_CMD=(mpirun -np "$RANKS")
    [ "$(id -u)" -eq 0 ] && MPI_CMD+=(--allow-run-as-root)
    # --oversubscribe: the cluster has more ranks than this machine has cores. --bind-to none: ranks
    # share the cores, as the simulated nodes would each have their own. pml ob1 + btl tcp,self keep
    # every byte on the shaped veth links (ucx, vader and the shared-memory collectives would not).
    # han (hierarchical collectives) stays off too, so that MPI's own all-reduce is flat.
    # shellcheck disable=SC2054  # "^sm,han" is one mpirun value
    MPI_CMD+=(--oversubscribe --bind-to none --mca pml ob1 --mca coll ^sm,han
              --mca btl_tcp_if_include "$SUBNET" --mca oob_tcp_if_include "$SUBNET"
              -x PMIX_MCA_ptl_tcp_remote_connections -x PMIX_MCA_ptl_tcp_if_include
              -x INT4DDP_NETNS_PREFIX)
    if [ "$RPN" -eq 1 ]; then
        # shellcheck disable=SC2054  # "tcp,self" is one mpirun value
        MPI_CMD+=(--mca btl tcp,self "${extra[@]}" "$WRAPPER" "$prog" "$@")
        return 0
    fi
    # Nodes of K ranks: one daemon per node, started in its namespace under the host name
    # <prefix>n<j> by netns_rsh.sh (Open MPI's remote shell), so the ranks of a node are one host to
    # Open MPI: vader (shared memory) between them, tcp between nodes. No tree spawn: every daemon
    # is started from the root namespace.
    local hosts="" j
    for ((j = 0; j < NODES; j++)); do hosts+="${hosts:+,}${PREFIX}n$j:$RPN"; done
    # shellcheck disable=SC2054  # "vader,tcp,self" is one mpirun value
    MPI_CMD+=(--mca btl vader,tcp,self --host "$hosts"
              --mca plm_rsh_agent "$LAUNCH_DIR/netns_rsh.sh" --mca plm_rsh_no_tree_spawn 1
              "${extra[@]}" "$prog" "$@")
}

# The PMIx server inside mpirun runs in the root namespace: it must listen on the bridge address and
# accept connections from other addresses (the ranks). Clients get the same settings through -x.
export_mpi_env() {
    export PMIX_MCA_ptl_tcp_remote_connections=1
    export PMIX_MCA_ptl_tcp_if_include="$SUBNET"
    export INT4DDP_NETNS_PREFIX="$PREFIX"
}

# Runs CMD in the background and waits, so a TERM or INT sent to this script (timeout, kill, Ctrl-C)
# is acted on at once: CMD gets TERM (a background job ignores INT), and the EXIT trap tears down.
run_forwarding_signals() {
    local child rc=0
    "$@" <&0 9>&- &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 130' INT
    trap 'kill -TERM "$child" 2>/dev/null; wait "$child"; exit 143' TERM
    wait "$child" || rc=$?
    trap 'exit 130' INT
    trap 'exit 143' TERM
    return "$rc"
}

# ---------------------------------------------------------------------------------------------------
# Link counters

kCounterFields="tx_bytes rx_bytes tx_packets rx_packets"

# read_counters: one line per namespace "r tx_bytes rx_bytes tx_packets rx_packets" of the veth end
# inside namespace r (/sys/class/net there is the namespace's own): rank r, or node r.
read_counters() {
    local r ns f line
    for ((r = 0; r < NODES; r++)); do
        ns="${PREFIX}$r" line="$r"
        for f in $kCounterFields; do
            line+=" $(ip netns exec "$ns" cat "/sys/class/net/${PREFIX}p$r/statistics/$f")" || return 1
        done
        echo "$line"
    done
}

# report_counters BEFORE AFTER: the per-rank differences as a table and a JSON line on stderr, and
# the JSON line into $INT4DDP_NETNS_COUNTERS if set.
report_counters() {
    local json unit=rank
    [ "$RPN" -eq 1 ] || unit=node
    json="$(awk -v unit="$unit" 'NR == FNR { b[$1] = $0; next }
        { split(b[$1], o, " "); printf "%s{\"%s\":%d,\"tx\":%.0f,\"rx\":%.0f,\"tx_packets\":%.0f,\"rx_packets\":%.0f}",
          (FNR > 1 ? "," : ""), unit, $1, $2 - o[2], $3 - o[3], $4 - o[4], $5 - o[5] }
        ' <(echo "$1") <(echo "$2"))"
    json="{\"netns_bytes\":[$json]}"
    awk -v unit="$unit" 'NR == FNR { b[$1] = $0; next }
        FNR == 1 { printf "netns_cluster: link counters during the command (veth end inside each %s namespace)\n", unit
                   printf "netns_cluster: %4s %14s %14s %11s %11s\n", unit, "tx bytes", "rx bytes", "tx pkts", "rx pkts" }
        { split(b[$1], o, " ")
          printf "netns_cluster: %4d %14.0f %14.0f %11.0f %11.0f\n", $1, $2 - o[2], $3 - o[3], $4 - o[4], $5 - o[5] }' \
        <(echo "$1") <(echo "$2") >&2
    echo "$json" >&2
    if [ -n "${INT4DDP_NETNS_COUNTERS:-}" ]; then
        echo "$json" >"${INT4DDP_NETNS_COUNTERS}.tmp" && mv "${INT4DDP_NETNS_COUNTERS}.tmp" "$INT4DDP_NETNS_COUNTERS"
    fi
}

# ---------------------------------------------------------------------------------------------------

main() {
    [ $# -ge 1 ] || usage
    # A signal becomes an ordinary exit, so the EXIT traps (teardown) run.
    trap 'exit 130' INT
    trap 'exit 143' TERM
    local cmd="$1"
    shift
    case "$cmd" in
        -h|--help|help) usage 0 ;;
        status)
            cluster_status ;;
        down)
            require_root; require_tools; take_lock; cluster_down ;;
        up)
            parse_cluster_opts "$@"
            [ ${#REST[@]} -eq 0 ] || die "up takes no command"
            require_root; require_tools; validate_settings; take_lock
            if is_up_with_settings; then
                log "already up with these settings"
                return 0
            fi
            [ ! -f "$STATE_FILE" ] || cluster_down
            check_subnet; probe_kernel; cluster_up ;;
        run|mpirun)
            parse_cluster_opts "$@"
            [ ${#REST[@]} -gt 0 ] || die "$cmd needs a command after --"
            require_root; require_tools; validate_settings
            if [ "$cmd" = mpirun ]; then
                command -v mpirun >/dev/null 2>&1 || die "mpirun not found (apt-get install openmpi-bin)"
                export_mpi_env
                mpirun_cmd "${REST[@]}"
                REST=("${MPI_CMD[@]}")
            fi
            take_lock
            is_up_with_settings || { check_subnet; probe_kernel; }
            ensure_up
            [ "$BROUGHT_UP" = 1 ] && [ "$KEEP" = 0 ] && trap 'cluster_down' EXIT
            [ "$cmd" = mpirun ] && log "${REST[*]}"
            local before after rc=0
            [ -z "${INT4DDP_NETNS_COUNTERS:-}" ] || rm -f "$INT4DDP_NETNS_COUNTERS"
            before="$(read_counters)" || die "cannot read the link counters of the rank namespaces"
            run_forwarding_signals "${REST[@]}" || rc=$?
            if after="$(read_counters)"; then
                report_counters "$before" "$after"
            else
                log "cannot read the link counters after the command"
            fi
            return "$rc" ;;
        mpirun-cmd)
            parse_cluster_opts "$@"
            RATE="${RATE:-1gbit}"
            validate_settings
            export_mpi_env
            mpirun_cmd "${REST[@]}"
            echo "export PMIX_MCA_ptl_tcp_remote_connections=1" \
                "PMIX_MCA_ptl_tcp_if_include=$SUBNET INT4DDP_NETNS_PREFIX=$PREFIX"
            printf '%q ' "${MPI_CMD[@]}"
            echo ;;
        *) die "unknown command '$cmd' (up, down, status, run, mpirun, mpirun-cmd)" ;;
    esac
}

main "$@"
