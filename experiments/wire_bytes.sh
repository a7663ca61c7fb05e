#!/usr/bin/env bash
# experiments/wire_bytes.sh: measured wire bytes per rank on the simulated cluster
# (launch/netns_cluster.sh, 4 ranks, 1 Gbit/s) beside the modelled bytes (Communicator::bytes_sent).
#
# The link counters of a run (launch/netns_cluster.sh prints them per rank) also hold fixed costs:
# MPI/PMIx start-up, the initial weight broadcast, evaluation, the bench's warm-up and checks. Each
# case is therefore run twice, with A and B repetitions and otherwise identical, and the counter
# difference divided by B - A: the fixed costs cancel and what is left is the traffic of one
# repetition, headers, ACKs and retransmissions included.
#   bench:  bench_allreduce, 64 MB of fp32 gradient, --iters A vs B (one repetition = one barrier
#           plus one all-reduce); modelled = the row's wire_bytes_modelled.
#   train:  int4ddp train, mlp2048 with fp32 layers, 64 images per rank on the synthetic set (as
#           experiments/scaling.sh), train.max_steps A vs B (both inside the first epoch, so the
#           evaluation at the end is in both); modelled = median comm.bytes_sent per step (rank 0).
# measured = tx bytes of the rank's veth end per repetition (mean over ranks; min and max beside);
# diff% = (measured - modelled) / modelled; B/pkt = the extra bytes per transmitted packet (veth
# packets are GSO super-packets of up to 64 KiB with one set of headers each).
#
# Writes runs/wire_bytes/ (logs, counters, results.jsonl), prints a table and one final JSON line.
# Needs root. Usage: experiments/wire_bytes.sh [--cases "bench train"] [--modes "int4 fp32"]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${INT4DDP_BUILD:-$ROOT/build}"
source "$ROOT/experiments/cluster_train_args.sh"
cases="bench train"
modes="int4 fp32"
while [ $# -gt 0 ]; do
    case "$1" in
        --cases) cases="$2"; shift ;;
        --modes) modes="$2"; shift ;;
        *) echo "usage: experiments/wire_bytes.sh [--cases \"bench train\"] [--modes \"int4 fp32\"]" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || { echo "wire_bytes.sh: needs root (network namespaces)" >&2; exit 1; }
ranks=4 rate=1gbit
out="$ROOT/runs/wire_bytes"
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"
py=/usr/bin/python3
[ -x "$py" ] || py=python3

# cluster TAG CMD...: runs CMD under mpirun on the cluster, log in $out/TAG.log, counters in
# $out/TAG.counters.json.
cluster() {
    local tag="$1"
    shift
    INT4DDP_BUILD="$BUILD" INT4DDP_NETNS_COUNTERS="$out/$tag.counters.json" \
        "$ROOT/launch/netns_cluster.sh" mpirun --ranks "$ranks" --rate "$rate" -- "$@" \
        > "$out/$tag.log" 2>&1 ||
        { echo "run $tag failed; see $out/$tag.log" >&2; tail -5 "$out/$tag.log" >&2; exit 1; }
}

bench() {  # mode reps
    cluster "bench_${1}_$2" "$BUILD/experiments/bench_allreduce" --min-bytes 64M --max-bytes 64M \
        --iters "$2" --warmup 1 --modes "$1" --no-check
    grep '^{"bench"' "$out/bench_${1}_$2.log" > "$out/bench_${1}_$2.model.json"
}

train() {  # mode steps
    cluster_train_args "$ROOT/configs/mlp2048.yaml" "$1" "$2" "$out/train_${1}_$2.jsonl" "$out/ck"
    cluster "train_${1}_$2" int4ddp "${TRAIN_ARGS[@]}"
    cp "$out/train_${1}_$2.jsonl" "$out/train_${1}_$2.model.json"
}

reps_for() {  # case -> A B
    case "$1" in bench) echo "1 5" ;; train) echo "10 30" ;; esac
}

for c in $cases; do
    read -r a b <<< "$(reps_for "$c")"
    for mode in $modes; do
        echo "== $c, $mode, $ranks ranks, $rate: $a and $b repetitions" >&2
        "$c" "$mode" "$a"
        "$c" "$mode" "$b"
        "$py" - "$c" "$mode" "$a" "$b" "$out" >> "$results" <<'PY'
import json, statistics, sys
case, mode, a, b, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
def counters(n):
    return json.load(open(f"{out}/{case}_{mode}_{n}.counters.json"))["netns_bytes"]
def modelled(n):
    lines = [json.loads(l) for l in open(f"{out}/{case}_{mode}_{n}.model.json") if l.strip()]
    if case == "bench":
        return float(lines[0]["rows"][0]["wire_bytes_modelled"])
    steps = [l["comm"]["bytes_sent"] for l in lines if l.get("type") == "step" and "comm" in l]
    return float(statistics.median(steps))
ca, cb = counters(a), counters(b)
reps = b - a
per = {k: [(y[k] - x[k]) / reps for x, y in zip(ca, cb)] for k in ("tx", "rx", "tx_packets")}
tx = statistics.mean(per["tx"])
mod = modelled(b)
pk = statistics.mean(per["tx_packets"])
print(json.dumps({
    "case": case, "mode": mode, "ranks": len(ca), "reps": [a, b],
    "modelled_bytes": mod, "measured_tx_bytes": tx,
    "measured_tx_min": min(per["tx"]), "measured_tx_max": max(per["tx"]),
    "measured_rx_bytes": statistics.mean(per["rx"]), "tx_packets": pk,
    "diff_pct": 100.0 * (tx - mod) / mod if mod else None,
    "extra_bytes_per_packet": (tx - mod) / pk if pk else None,
    "fixed_tx_bytes": statistics.mean(x["tx"] for x in ca) - a * tx}))
PY
        tail -n 1 "$results" >&2
    done
done

"$py" - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| case | all-reduce | A, B | modelled B/rep | measured tx B/rep (min-max over ranks) | diff | tx packets/rep | extra B/packet | fixed tx B in the A run (start-up, warm-up, checks) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f'| {r["case"]} | {r["mode"]} | {r["reps"][0]}, {r["reps"][1]} | {r["modelled_bytes"]:,.0f} | '
          f'{r["measured_tx_bytes"]:,.0f} ({r["measured_tx_min"]:,.0f}-{r["measured_tx_max"]:,.0f}) | '
          f'{r["diff_pct"]:+.2f}% | {r["tx_packets"]:,.1f} | {r["extra_bytes_per_packet"]:.1f} | '
          f'{r["fixed_tx_bytes"]:,.0f} |')
print(json.dumps({"wire_bytes": rows}))
PY
