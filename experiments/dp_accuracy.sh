#!/usr/bin/env bash
# experiments/dp_accuracy.sh: the data-parallel accuracy comparison of issue 4. Trains the 4/4/4 cnn
# of configs/default.yaml on Fashion-MNIST with 4 ranks (mpirun, this machine) and each gradient
# all-reduce:
#   fp32            plain MPI_Allreduce
#   int4 minmax     two-shot, gamma = 1, with and without error feedback (worker + server)
#   int4 lbt        two-shot, lbt gamma per bucket, with and without error feedback
#   int4 topk       two-shot, each block clipped at its 5th largest magnitude (comm.topk = 4),
#                   with and without error feedback
# and writes a table (test accuracy, difference to fp32, final bucket gammas, mean bytes sent per
# step, wall time) into experiments/RESULTS.md between the dp-accuracy markers.
#
# Schedule: the default config's (3 epochs, cosine from lr 0.05) with 32 images per rank, so the
# global batch (128) and the number of steps equal the single-process default. About 4 minutes a
# run on the 2-core development VM (4 ranks share 2 cores).
#
# Usage: experiments/dp_accuracy.sh [--quick] [--seed S] [--ranks N] [--epochs E] [--runs LIST]
#                                   [--report]
#   --epochs  a shorter (or longer) schedule than the config's 3 epochs
#   --runs    comma-separated subset of: fp32, minmax-ef, minmax-noef, lbt-ef, lbt-noef, topk-ef,
#             topk-noef (default: all); a subset or another --epochs writes its table to stdout
#             only, RESULTS.md keeps the full comparison
#   --report  rebuild the table from the runs already in runs/dp_accuracy (no training)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
quick=0
seed=0
ranks=4
report=0
epochs=""
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --seed) seed="$2"; shift ;;
        --ranks) ranks="$2"; shift ;;
        --report) report=1 ;;
        --epochs) epochs="$2"; shift ;;
        --runs) only="$2"; shift ;;
        *) echo "usage: experiments/dp_accuracy.sh [--quick] [--seed S] [--ranks N] [--epochs E] [--runs LIST] [--report]" >&2; exit 2 ;;
    esac
    shift
done
int4ddp_setup jq
[ "$report" = 1 ] || INT4DDP_TARGETS=int4ddp int4ddp_build >/dev/null
out_dir="$ROOT/runs/dp_accuracy"
[ "$quick" = 1 ] && out_dir="$ROOT/runs/dp_accuracy-quick"
[ -n "$epochs" ] && out_dir="$out_dir-e$epochs"
mkdir -p "$out_dir"

per_rank=$((128 / ranks))
common=(--set "train.seed=$seed" --set "train.batch_size=$per_rank" --set log.progress=off
        --set log.print_every=50 --set train.checkpoint_every_epochs=0 --set log.diagnostics_every=50
        --set comm.backend=mpi)
[ -n "$epochs" ] && common+=(--set "train.epochs=$epochs")
if [ "$quick" = 1 ]; then
    common+=(--set data.dataset=synthetic --set train.max_steps=5 --set data.synthetic_train_size=2048
             --set data.synthetic_test_size=256)
fi

noef="--set comm.worker_error_feedback=false --set comm.server_error_feedback=false"
# tag|name|settings; the tag names the run's files and --runs selects by it
all_runs=("fp32|fp32|--set comm.mode=fp32"
          "minmax-ef|int4 minmax, EF|--set comm.mode=int4 --set comm.grad_policy=minmax"
          "minmax-noef|int4 minmax, no EF|--set comm.mode=int4 --set comm.grad_policy=minmax $noef"
          "lbt-ef|int4 lbt, EF|--set comm.mode=int4 --set comm.grad_policy=lbt"
          "lbt-noef|int4 lbt, no EF|--set comm.mode=int4 --set comm.grad_policy=lbt $noef"
          "topk-ef|int4 topk 4, EF|--set comm.mode=int4 --set comm.grad_policy=topk --set comm.topk=4"
          "topk-noef|int4 topk 4, no EF|--set comm.mode=int4 --set comm.grad_policy=topk --set comm.topk=4 $noef")
runs=()
for r in "${all_runs[@]}"; do
    case ",${only:-${r%%|*}}," in *",${r%%|*},"*) runs+=("$r") ;; esac
done
[ ${#runs[@]} -gt 0 ] || { echo "--runs '$only' selects no run" >&2; exit 2; }

rows=()
fp32_acc=""
for r in "${runs[@]}"; do
    tag="${r%%|*}"
    r="${r#*|}"
    name="${r%%|*}"
    read -r -a sets <<< "${r#*|}"
    echo "== $name ($ranks ranks)"
    if [ "$report" = 0 ]; then
        t0=$(date +%s)
        "$ROOT/launch/mpirun.sh" -np "$ranks" -- int4ddp train --config "$ROOT/configs/default.yaml" \
            "${common[@]}" "${sets[@]}" --set train.overwrite=true --set "log.metrics_path=$out_dir/$tag.jsonl" \
            --set "train.checkpoint_dir=$out_dir/ck_$tag" > "$out_dir/$tag.log" 2>&1 ||
            { echo "run '$name' failed; see $out_dir/$tag.log" >&2; tail -5 "$out_dir/$tag.log" >&2; exit 1; }
        echo $(( $(date +%s) - t0 )) > "$out_dir/$tag.secs"
    fi
    secs=$(cat "$out_dir/$tag.secs")
    acc=$(jq -r 'select(.type=="final") | .test_accuracy * 100' "$out_dir/$tag.jsonl")
    gam=$(jq -r 'select(.type=="step" and .comm != null) | .comm.bucket_gamma | map(. * 1000 | round / 1000) | tostring' \
          "$out_dir/$tag.jsonl" | tail -1)
    bytes=$(jq -s -r '[.[] | select(.type=="epoch") | .time.bytes_sent] | add / length | . / 1e6 * 100 | round / 100' \
          "$out_dir/$tag.jsonl")
    [ -z "$fp32_acc" ] && [ "$tag" = fp32 ] && fp32_acc="$acc"
    delta=$(awk -v a="$acc" -v b="$fp32_acc" 'BEGIN { if (b == "") print "-"; else printf "%+.2f", a - b }')
    printf '   test accuracy %.2f%% (%s vs fp32), %s s\n' "$acc" "$delta" "$secs"
    rows+=("| $name | $(printf '%.2f' "$acc") | $delta | ${gam:-} | $bytes | $secs |")
done
total=0
for r in "${runs[@]}"; do total=$((total + $(cat "$out_dir/${r%%|*}.secs"))); done

table=$(cat <<EOF
<!-- dp-accuracy:begin -->
Command: \`experiments/dp_accuracy.sh --seed $seed --ranks $ranks$([ "$quick" = 1 ] && echo " --quick")${epochs:+ --epochs $epochs}${only:+ --runs $only}\`
($(date -u +%Y-%m-%d), $(nproc) cores, $ranks ranks, total wall time ${total} s). cnn 4/4/4 lbt layers,
configs/default.yaml schedule, $per_rank images per rank per step (global batch 128).

| all-reduce | test acc % | vs fp32 | final bucket gamma | MB sent / step / rank | wall s |
|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")
<!-- dp-accuracy:end -->
EOF
)
echo "$table"
[ "$quick" = 1 ] || [ -n "$epochs" ] || [ -n "$only" ] && exit 0
results="$ROOT/experiments/RESULTS.md"
if grep -q '<!-- dp-accuracy:begin -->' "$results"; then
    python3 - "$results" "$table" <<'PY'
import sys, re
path, table = sys.argv[1], sys.argv[2]
s = open(path).read()
s = re.sub(r'<!-- dp-accuracy:begin -->.*?<!-- dp-accuracy:end -->', lambda m: table, s, flags=re.S)
open(path + '.tmp', 'w').write(s)
PY
    mv "$results.tmp" "$results"
else
    printf '\n%s\n' "$table" >> "$results"
fi
