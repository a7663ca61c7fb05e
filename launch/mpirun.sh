#!/usr/bin/env bash
# mpirun for int4ddp, on one machine or across nodes with a hostfile:
#
#   launch/mpirun.sh -np N [--hostfile F | -H h1,h2] [MPIRUN_OPTS...] [--] int4ddp train --config FILE
#
# What it adds to mpirun (each only if the caller did not already say it):
#   * PROG `int4ddp` becomes $INT4DDP_BUILD/int4ddp (default build/), as an absolute path; across
#     nodes that path must exist on every node (shared file system or the same checkout and build).
#   * --allow-run-as-root when run as root.
#   * --oversubscribe when N is more than this machine's cores and no hostfile/host list is given
#     (and not inside a SLURM job, whose allocation sets the slots).
#   * --bind-to none: a rank runs its worker threads (train.threads) and a communication thread, and
#     OpenMPI's default for N <= 2 (bind to one core) would put them all on one core. Give --bind-to
#     (e.g. `--map-by ppr:1:node --bind-to none`, or `--bind-to socket`) to choose yourself.
# Everything else is passed to mpirun unchanged. Without `--`, the program starts at the first word
# that is not an option or an option's value (mpirun options that take values are listed below; for
# any other, put `--` before the program). INT4DDP_MPIRUN_DRYRUN=1 prints the command instead.
set -euo pipefail

INT4DDP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INT4DDP_BUILD="${INT4DDP_BUILD:-$INT4DDP_ROOT/build}"

die() { echo "mpirun.sh: error: $*" >&2; exit 1; }

[ $# -gt 0 ] || die "usage: launch/mpirun.sh -np N [--hostfile F] [MPIRUN_OPTS...] [--] PROG ARGS..."
command -v mpirun >/dev/null 2>&1 || die "mpirun not found (apt-get install openmpi-bin)"

mpi_opts=()
prog=()
has_sep=0
for a in "$@"; do
    if [ "$a" = -- ]; then has_sep=1; break; fi
done
if [ "$has_sep" = 1 ]; then
    while [ "$1" != -- ]; do mpi_opts+=("$1"); shift; done
    shift
    prog=("$@")
else
    while [ $# -gt 0 ]; do
        case "$1" in
            --mca|-mca|--gmca|-gmca|--tune-mca)  # two values: name and value
                [ $# -ge 3 ] || die "$1 needs a name and a value"
                mpi_opts+=("$1" "$2" "$3"); shift 3 ;;
            -np|--np|-n|-c|--hostfile|-hostfile|--machinefile|-machinefile|-H|--host|-host|\
            -x|--map-by|-map-by|--bind-to|-bind-to|--rank-by|-rank-by|--npernode|-npernode|\
            -N|--npersocket|-npersocket|--rankfile|-rankfile|-rf|--wdir|-wdir|-wd|--prefix|\
            --output-filename|--timeout|--tmpdir|--report-bindings-file|--default-hostfile|\
            --cpus-per-proc|--cpus-per-rank|--cpu-set|--am|-am|--tune|--path)
                [ $# -ge 2 ] || die "$1 needs a value"
                mpi_opts+=("$1" "$2"); shift 2 ;;
            -*) mpi_opts+=("$1"); shift ;;
            *) break ;;
        esac
    done
    prog=("$@")
fi
[ ${#prog[@]} -gt 0 ] || die "no program given (e.g. -- int4ddp train --config configs/default.yaml)"

# What the caller already chose.
np="" hosts=0 has_root=0 has_over=0 has_bind=0
for ((i = 0; i < ${#mpi_opts[@]}; i++)); do
    case "${mpi_opts[i]}" in
        -np|--np|-n|-c) np="${mpi_opts[i + 1]:-}" ;;
        --hostfile|-hostfile|--machinefile|-machinefile|-H|--host|-host|--rankfile|-rankfile|-rf|\
        --default-hostfile) hosts=1 ;;
        --allow-run-as-root) has_root=1 ;;
        --oversubscribe|-oversubscribe) has_over=1 ;;
        --bind-to|-bind-to|--bind-to-core|--bind-to-socket|--cpu-set|--cpus-per-proc|--cpus-per-rank)
            has_bind=1 ;;
    esac
done
if [ -n "$np" ] && ! [[ "$np" =~ ^[1-9][0-9]*$ ]]; then die "-np must be a positive count (got '$np')"; fi
[ -n "$np" ] || [ "$hosts" = 1 ] || die "give -np N (or a --hostfile whose slots set the count)"

if [ "${prog[0]}" = int4ddp ] && ! command -v int4ddp >/dev/null 2>&1; then
    [ -x "$INT4DDP_BUILD/int4ddp" ] ||
        die "$INT4DDP_BUILD/int4ddp not found; build it first (launch/run.sh, or cmake --build build)," \
            "or set INT4DDP_BUILD"
    prog[0]="$INT4DDP_BUILD/int4ddp"
fi

extra=()
[ "$(id -u)" -eq 0 ] && [ "$has_root" = 0 ] && extra+=(--allow-run-as-root)
# Inside a SLURM job the allocation defines the slots; elsewhere no host list means this machine.
if [ "$hosts" = 0 ] && [ "$has_over" = 0 ] && [ -n "$np" ] && [ -z "${SLURM_JOB_ID:-}" ] &&
    [ "$np" -gt "$(nproc 2>/dev/null || echo 1)" ]; then
    extra+=(--oversubscribe)
fi
[ "$has_bind" = 0 ] && extra+=(--bind-to none)

cmd=(mpirun "${extra[@]}" "${mpi_opts[@]}" "${prog[@]}")
if [ "${INT4DDP_MPIRUN_DRYRUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
echo "mpirun.sh: ${cmd[*]}" >&2
exec "${cmd[@]}"
