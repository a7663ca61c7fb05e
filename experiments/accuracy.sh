#!/usr/bin/env bash
# experiments/accuracy.sh: the accuracy sweep of issue 3. Trains cnn and resnet20 on Fashion-MNIST
# at FP32, 8/8/8 and 4/4/4, the low-bit ones with the gradient interval policies minmax, fixed 0.8,
# fixed 0.6 and lbt (18 runs), and writes a table (test accuracy, final gradient gamma range over
# the quantized layers, wall time) into experiments/RESULTS.md between the accuracy markers, with
# the command, seed and schedule.
#
# Schedule, chosen so the sweep fits in about two hours on the 2-core development VM at the
# throughput measured by bench_train (cnn ~930 img/s, resnet20 ~125 img/s, one process):
#   cnn       full 60k training set, 3 epochs, cosine from lr 0.05   (~3.5 min a run)
#   resnet20  first 12800 training images, 3 epochs, cosine from 0.05 (~5.5 min a run)
# Both evaluate on the full 10k test set. Override with CNN_SET / RESNET_SET (extra --set args).
#
# Usage: experiments/accuracy.sh [--quick] [--seed S] [--models "cnn resnet20"]
#   --quick   a few steps on the synthetic set per run, to check the script itself (about a minute)
#   --models  which models to sweep (default both)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
quick=0
seed=0
models="cnn resnet20"
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --seed) seed="$2"; shift ;;
        --models) models="$2"; shift ;;
        *) echo "usage: experiments/accuracy.sh [--quick] [--seed S] [--models \"cnn resnet20\"]" >&2; exit 2 ;;
    esac
    shift
done
INT4DDP_TARGETS=int4ddp int4ddp_build >/dev/null
bin="$INT4DDP_BUILD/int4ddp"
out_dir="$ROOT/runs/accuracy"
[ "$quick" = 1 ] && out_dir="$ROOT/runs/accuracy-quick"
mkdir -p "$out_dir"
: > "$out_dir/times.txt"

common=(--set "train.seed=$seed" --set schedule.kind=cosine --set optim.lr=0.05
        --set train.epochs=3 --set log.progress=off --set log.print_every=0
        --set train.checkpoint_every_epochs=0 --set log.diagnostics_every=50)
cnn_set=(${CNN_SET:-})
resnet_set=(--set data.max_train_examples=12800 ${RESNET_SET:-})
if [ "$quick" = 1 ]; then
    common+=(--set data.dataset=synthetic --set train.max_steps=3 --set data.synthetic_train_size=512
             --set data.synthetic_test_size=256 --set train.batch_size=32)
    resnet_set=()
fi

runs=()
for model in $models; do
    case "$model" in cnn|resnet20) ;; *) echo "unknown model $model" >&2; exit 2 ;; esac
    runs+=("$model fp32 32 none")
    for bits in 8 4; do
        for policy in minmax fixed0.8 fixed0.6 lbt; do runs+=("$model $bits/$bits/$bits $bits $policy"); done
    done
done

start_all=$(date +%s)
for r in "${runs[@]}"; do
    read -r model label bits policy <<<"$r"
    name="${model}_${label//\//-}_${policy}"
    args=(train --config "$ROOT/configs/$model.yaml" "${common[@]}"
          --set "quant.weight_bits=$bits" --set "quant.activation_bits=$bits" --set "quant.grad_bits=$bits"
          --set train.overwrite=true --set "log.metrics_path=$out_dir/$name/metrics.jsonl")
    case "$policy" in
        fixed*) args+=(--set quant.grad_policy=fixed --set "quant.fixed_gamma=${policy#fixed}") ;;
        none) ;;
        *) args+=(--set "quant.grad_policy=$policy") ;;
    esac
    if [ "$model" = cnn ]; then args+=("${cnn_set[@]}"); else args+=("${resnet_set[@]}"); fi
    t0=$(date +%s)
    echo "== $name: int4ddp ${args[*]}"
    "$bin" "${args[@]}" > "$out_dir/$name.log" 2>&1 || { echo "run $name failed, see $out_dir/$name.log" >&2; exit 1; }
    echo "$name $(( $(date +%s) - t0 ))" >> "$out_dir/times.txt"
    tail -1 "$out_dir/$name.log"
done
total=$(( $(date +%s) - start_all ))

python3 - "$out_dir" "$ROOT/experiments/RESULTS.md" "$quick" "$seed" "$total" "${common[*]}" "$models" <<'PY'
import json, os, sys
out_dir, results, quick, seed, total, common, models = sys.argv[1:8]
times = dict(l.split() for l in open(os.path.join(out_dir, "times.txt")))
rows = []
for name in sorted(times, key=lambda n: (not n.startswith("cnn"), n)):
    final, gammas = None, []
    for line in open(os.path.join(out_dir, name, "metrics.jsonl")):
        j = json.loads(line)
        if j.get("type") == "final": final = j
        if j.get("type") == "quant": gammas = [l["gamma"] for l in j["layers"]]
    g = f"{min(gammas):.3f}-{max(gammas):.3f}" if gammas else "-"
    rows.append(f"| {name} | {100 * final['test_accuracy']:.2f}% | {g} | {times[name]} s |")
table = "\n".join([
    "<!-- accuracy:begin -->",
    f"Command: `experiments/accuracy.sh{' --quick' if quick == '1' else ''} --seed {seed} --models \"{models}\"` "
    f"(common settings: `{common}`); whole sweep {total} s.",
    "", "| run (model_bits_policy) | test accuracy | final gradient gamma (min-max over layers) | wall |",
    "|---|---|---|---|", *rows, "<!-- accuracy:end -->"])
if quick == "1":
    print(table)
    sys.exit(0)
text = open(results).read()
if "<!-- accuracy:begin -->" in text:
    a = text.index("<!-- accuracy:begin -->"); b = text.index("<!-- accuracy:end -->") + len("<!-- accuracy:end -->")
    text = text[:a] + table + text[b:]
else:
    text += "\n### Accuracy sweep (experiments/accuracy.sh)\n\n" + table + "\n"
open(results, "w").write(text)
print(table)
PY
