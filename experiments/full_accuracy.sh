#!/usr/bin/env bash
# experiments/full_accuracy.sh: the full-length accuracy targets of issue 3 (cnn on Fashion-MNIST,
# the paper recipe of configs/cnn.yaml: 20 epochs, SGD lr 0.1, momentum 0.9, x0.1 at 50% and 75%):
#   fp32 (configs/cnn_fp32.yaml), 4/4/4 lbt (configs/cnn.yaml), 4/4/4 minmax.
# To fit the session it trains data parallel on RANKS ranks (default 2) with the fp32 all-reduce
# and train.batch_size = 128 / RANKS, which is the single-process batch-128 training up to float
# summation order (tests/test_dp_train.cpp checks that equivalence) except for batch-norm
# statistics, which each rank computes over its 64 images. About 12 minutes a run on the 2-core VM.
# Writes the table into experiments/RESULTS.md between the full-accuracy markers.
#
# Usage: experiments/full_accuracy.sh [--ranks N] [--seed S] [--runs fp32,lbt,minmax] [--report]
#   --runs: which of the three runs (default all). Seed 0 writes runs/full_accuracy, seed S > 0
#   runs/full_accuracy_seedS. Only seed 0 with all runs rewrites the RESULTS.md table; other seeds
#   print their table (and leave it in the run folder as table.md).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
ranks=2
seed=0
report=0
select=fp32,lbt,minmax
while [ $# -gt 0 ]; do
    case "$1" in
        --ranks) ranks="$2"; shift ;;
        --seed) seed="$2"; shift ;;
        --runs) select="$2"; shift ;;
        --report) report=1 ;;
        *) echo "usage: experiments/full_accuracy.sh [--ranks N] [--seed S] [--runs fp32,lbt,minmax] [--report]" >&2; exit 2 ;;
    esac
    shift
done
int4ddp_setup jq dataset-fashion-mnist
[ "$report" = 1 ] || INT4DDP_TARGETS=int4ddp int4ddp_build >/dev/null
out_dir="$ROOT/runs/full_accuracy"
[ "$seed" = 0 ] || out_dir="$ROOT/runs/full_accuracy_seed$seed"
mkdir -p "$out_dir"
common=(--set "train.seed=$seed" --set "train.batch_size=$((128 / ranks))" --set comm.backend=mpi
        --set comm.mode=fp32 --set log.progress=off --set log.print_every=100
        --set train.checkpoint_every_epochs=5 --set log.diagnostics_every=100 --set train.threads=1)
# name|config|extra sets|selector; the run tags (run0, run1, run2) stay fixed whatever is selected.
runs=("cnn fp32|configs/cnn_fp32.yaml||fp32"
      "cnn 4/4/4 lbt|configs/cnn.yaml||lbt"
      "cnn 4/4/4 minmax|configs/cnn.yaml|--set quant.grad_policy=minmax|minmax")
for k in ${select//,/ }; do
    case "$k" in fp32|lbt|minmax) ;; *) echo "--runs: unknown run '$k' (fp32, lbt, minmax)" >&2; exit 2 ;; esac
done
rows=()
i=0
for r in "${runs[@]}"; do
    IFS='|' read -r name config extra key <<< "$r"
    read -r -a extra_sets <<< "$extra"
    tag="run$i"
    i=$((i + 1))
    [[ ",$select," == *",$key,"* ]] || continue
    echo "== $name"
    if [ "$report" = 0 ]; then
        t0=$(date +%s)
        "$ROOT/launch/mpirun.sh" -np "$ranks" -- int4ddp train --config "$ROOT/$config" \
            "${common[@]}" "${extra_sets[@]}" --set train.overwrite=true --set "log.metrics_path=$out_dir/$tag.jsonl" \
            --set "train.checkpoint_dir=$out_dir/ck_$tag" > "$out_dir/$tag.log" 2>&1 ||
            { echo "run '$name' failed; see $out_dir/$tag.log" >&2; tail -5 "$out_dir/$tag.log" >&2; exit 1; }
        echo $(( $(date +%s) - t0 )) > "$out_dir/$tag.secs"
    fi
    acc=$(jq -r 'select(.type=="final") | .test_accuracy * 100' "$out_dir/$tag.jsonl")
    best=$(jq -s -r '[.[] | select(.type=="epoch" and .test_accuracy != null) | .test_accuracy] | max * 100' "$out_dir/$tag.jsonl")
    printf '   final %.2f%%, best epoch %.2f%%, %s s\n' "$acc" "$best" "$(cat "$out_dir/$tag.secs")"
    rows+=("| $name | $config $extra | $(printf '%.2f' "$acc") | $(printf '%.2f' "$best") | $(cat "$out_dir/$tag.secs") |")
done
{
    echo "<!-- full-accuracy:begin -->"
    echo "Command: \`experiments/full_accuracy.sh --ranks $ranks --seed $seed --runs $select\` ($(date -u +%Y-%m-%d), $(nproc) cores;"
    echo "$ranks ranks x $((128 / ranks)) images, fp32 all-reduce, 20 epochs, full 60k/10k Fashion-MNIST)."
    echo
    echo "| run | config | final test acc % | best epoch test acc % | wall s |"
    echo "|---|---|---|---|---|"
    printf '%s\n' "${rows[@]}"
    echo "<!-- full-accuracy:end -->"
} > "$out_dir/table.md"
cat "$out_dir/table.md"
res="$ROOT/experiments/RESULTS.md"
[ "$seed" = 0 ] && [ "$select" = fp32,lbt,minmax ] || exit 0
if grep -q '<!-- full-accuracy:begin -->' "$res"; then
    python3 - "$res" "$out_dir/table.md" <<'PY'
import re, sys
p, t = sys.argv[1], open(sys.argv[2]).read().rstrip("\n")
s = open(p).read()
open(p + ".tmp", "w").write(re.sub(r"<!-- full-accuracy:begin -->.*?<!-- full-accuracy:end -->", lambda m: t, s, flags=re.S))
PY
    mv "$res.tmp" "$res"
else
    printf '\n' >> "$res"
    cat "$out_dir/table.md" >> "$res"
fi
