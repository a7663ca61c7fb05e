#!/usr/bin/env bash
# The WRAPPER of shared/DESIGN.md section 5: mpirun starts every rank as `netns_exec.sh PROG ARGS`
# in the root namespace, and this moves it into its rank's namespace (i4d<rank>, made by
# launch/netns_cluster.sh up) before exec'ing PROG. `ip netns exec` keeps the environment (so the
# PMIx and OMPI_* variables mpirun set reach PROG) and the working directory; it needs root.
set -euo pipefail
rank="${OMPI_COMM_WORLD_RANK:-${PMIX_RANK:-}}"
[ -n "$rank" ] || { echo "netns_exec.sh: no OMPI_COMM_WORLD_RANK; start me under mpirun" >&2; exit 1; }
ns="${INT4DDP_NETNS_PREFIX:-i4d}$rank"
ip netns list | awk -v n="$ns" '$1 == n { f = 1 } END { exit !f }' ||
    { echo "netns_exec.sh: rank $rank: namespace $ns missing (launch/netns_cluster.sh up)" >&2; exit 1; }
exec ip netns exec "$ns" "$@"
