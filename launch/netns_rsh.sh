#!/usr/bin/env bash
# Open MPI's remote shell on the simulated cluster with nodes of several ranks
# (launch/netns_cluster.sh --ranks-per-node K sets it as plm_rsh_agent): `netns_rsh.sh HOST CMD...`
# runs CMD (an Open MPI daemon's command line, as ssh would run it: the words joined, read by a
# shell) inside node j's network namespace <prefix>j for HOST = <prefix>n<j>, in a new UTS
# namespace whose host name is HOST, so that every node is a host of its own to Open MPI.
set -euo pipefail
prefix="${INT4DDP_NETNS_PREFIX:-i4d}"
[ $# -ge 2 ] || { echo "netns_rsh.sh: usage: netns_rsh.sh HOST COMMAND..." >&2; exit 2; }
host="$1"
shift
node="${host#"${prefix}n"}"
[[ "$host" == "${prefix}n"* && "$node" =~ ^[0-9]+$ ]] ||
    { echo "netns_rsh.sh: host '$host' is not a simulated node ${prefix}n<j>" >&2; exit 1; }
ns="$prefix$node"
ip netns list | awk -v n="$ns" '$1 == n { f = 1 } END { exit !f }' ||
    { echo "netns_rsh.sh: node $host: namespace $ns missing (launch/netns_cluster.sh up)" >&2; exit 1; }
# shellcheck disable=SC2016  # $1 and $2 are the inner shell's
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$1" && eval "$2"' netns_rsh "$host" "$*"
