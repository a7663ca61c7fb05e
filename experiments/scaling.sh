#!/usr/bin/env bash
# experiments/scaling.sh: weak scaling of data-parallel training on the simulated cluster
# (launch/netns_cluster.sh: one network namespace per rank, every link shaped to RATE).
#
# For each link rate (1gbit, 10gbit), rank count (1, 2, 4), model (mlp2048: configs/mlp2048.yaml;
# resnet20: configs/resnet20.yaml with fp32 layers) and gradient all-reduce (fp32, int4) it trains
# STEPS steps with 64 images per rank on the synthetic set (same shapes as Fashion-MNIST) and takes
# the median over the steps after the first WARMUP of: step time, compute (forward + backward on the
# main thread), comm wait (main thread blocked on the last buckets), quantize and collective time
# on the communication thread, bytes sent (modelled: Communicator::bytes_sent). img/s = ranks * 64 /
# median step time. "measured" = the run's link counters (launch/netns_cluster.sh: tx bytes per
# rank, mean over ranks) divided by its steps: start-up and the initial weight broadcast included,
# so it is above the per-step figure; experiments/wire_bytes.sh separates them by differencing.
# The layers are fp32 in both models so that only the all-reduce differs between the fp32 and
# int4 rows (as in the PyTorch DDP reference of the issue). The fp32 all-reduce is the Communicator's
# pipelined ring (comm/ring_allreduce.h).
#
# External reference, same run: for mlp2048 at every rate and rank count, PyTorch DDP over gloo
# (experiments/ddp_torch.py under the same mpirun on the same cluster: same model, 64 images per
# rank, steps, warm-up and thread count) with its fp32 all-reduce (torch-fp32) and with its fp16
# compression hook (torch-fp16); compute = its steps under no_sync(). Without torch (Debian:
# apt-get install python3-torch, with libopenblas0-pthread for a fast BLAS) the table says
# "skipped: no torch" in its place and the script still succeeds. The columns "x torch fp32" and
# "x torch fp16" are the torch row's step time over ours.
#
# Writes runs/scaling/results.jsonl (one object per run), a table and PNG plots
# (experiments/plots/scaling_*.png), and the table into experiments/RESULTS.md between the scaling
# markers, and ends with one JSON line of the headline figures (mlp2048, 4 ranks, 1gbit):
#   {"experiment":"scaling","int4_step_s","fp32_step_s","torch_fp32_step_s","torch_fp16_step_s",
#    "int4_x_torch_fp32","int4_x_torch_fp16","fp32_x_torch_fp32"} (null where not run).
# Needs root (network namespaces). About 3 minutes on the 2-core development VM, where 4
# ranks share 2 cores, so compute time per step grows with the rank count there.
#
# Usage: experiments/scaling.sh [--quick] [--rates "1gbit 10gbit"] [--ranks "1 2 4"]
#                               [--models "mlp2048 resnet20"]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
source "$ROOT/experiments/cluster_train_args.sh"
rates="1gbit 10gbit"
ranks_list="1 2 4"
models="mlp2048 resnet20"
quick=0
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --rates) rates="$2"; shift ;;
        --ranks) ranks_list="$2"; shift ;;
        --models) models="$2"; shift ;;
        *) echo "usage: experiments/scaling.sh [--quick] [--rates R] [--ranks N] [--models M]" >&2; exit 2 ;;
    esac
    shift
done
[ "$(id -u)" = 0 ] || { echo "scaling.sh: needs root (network namespaces)" >&2; exit 1; }
int4ddp_setup jq python3-matplotlib iproute2
INT4DDP_TARGETS=int4ddp int4ddp_build >/dev/null
# Debian's python3 (where python3-matplotlib lives), not a pyenv shim earlier on PATH.
py=/usr/bin/python3
[ -x "$py" ] || py=python3
out_dir="$ROOT/runs/scaling"
[ "$quick" = 1 ] && out_dir="$ROOT/runs/scaling-quick"
mkdir -p "$out_dir" "$ROOT/experiments/plots"
results="$out_dir/results.jsonl"
: > "$results"
have_torch=1
"$py" -c "import torch" 2>/dev/null || {
    have_torch=0
    echo "scaling.sh: PyTorch DDP reference skipped: no torch for $py (apt-get install python3-torch)" >&2
}
subnet="${INT4DDP_NETNS_SUBNET:-10.213.0.0/24}"
prefix="${INT4DDP_NETNS_PREFIX:-i4d}"

# torch_ddp MODEL RATE N STEPS WARMUP: the PyTorch DDP reference rows (fp32, fp16 hook) for one cell.
torch_ddp() {
    local model="$1" rate="$2" n="$3" steps="$4" warmup="$5" hook tag
    if [ "$have_torch" = 0 ]; then
        jq -n -c --arg model "$model" --arg rate "$rate" --argjson n "$n" \
            '{model: $model, mode: "torch", rate: $rate, ranks: $n, skipped: "no torch"}' |
            tee -a "$results"
        return
    fi
    for hook in none fp16; do
        mode="torch-fp32"
        [ "$hook" = fp16 ] && mode="torch-fp16"
        tag="${model}_${mode}_${n}_${rate}"
        echo "== $model, PyTorch DDP gloo ($mode), $n rank(s), $rate"
        INT4DDP_NETNS_COUNTERS="$out_dir/$tag.counters.json" \
            "$ROOT/launch/netns_cluster.sh" mpirun --ranks "$n" --rate "$rate" -- \
            "$py" "$ROOT/experiments/ddp_torch.py" --hook "$hook" --steps "$steps" \
            --warmup "$warmup" --threads 1 --batch 64 --master-addr "${subnet%.0/24}.1" \
            --ifname "${prefix}p{rank}" > "$out_dir/$tag.log" 2>&1 ||
            { echo "run $tag failed; see $out_dir/$tag.log" >&2; tail -5 "$out_dir/$tag.log" >&2; exit 1; }
        grep '^{"bench": "ddp_torch"' "$out_dir/$tag.log" | tail -n 1 |
            jq -c --arg mode "$mode" --arg rate "$rate" \
                --argjson tx "$(jq '[.netns_bytes[].tx] | add / length' "$out_dir/$tag.counters.json")" '
                {model, mode: $mode, rate: $rate, ranks, steps: (.steps - .warmup), step_s,
                 compute_s, measured_tx_per_step: ($tx / .steps), img_per_s: (.ranks * .batch / .step_s),
                 torch: .torch}' | tee -a "$results"
    done
}

steps_for() {  # model -> steps, warmup
    if [ "$quick" = 1 ]; then echo "4 1"; return; fi
    case "$1" in mlp2048) echo "30 5" ;; resnet20) echo "12 3" ;; esac
}
config_for() {
    case "$1" in
        mlp2048) echo "$ROOT/configs/mlp2048.yaml" ;;
        resnet20) echo "$ROOT/configs/resnet20.yaml" ;;
        *) echo "unknown model $1" >&2; exit 2 ;;
    esac
}

for rate in $rates; do
    for n in $ranks_list; do
        for model in $models; do
            read -r steps warmup <<< "$(steps_for "$model")"
            for mode in fp32 int4; do
                tag="${model}_${mode}_${n}_${rate}"
                echo "== $model, $mode all-reduce, $n rank(s), $rate"
                cluster_train_args "$(config_for "$model")" "$mode" "$steps" "$out_dir/$tag.jsonl" \
                    "$out_dir/ck"
                INT4DDP_NETNS_COUNTERS="$out_dir/$tag.counters.json" \
                    "$ROOT/launch/netns_cluster.sh" mpirun --ranks "$n" --rate "$rate" -- \
                    int4ddp "${TRAIN_ARGS[@]}" > "$out_dir/$tag.log" 2>&1 ||
                    { echo "run $tag failed; see $out_dir/$tag.log" >&2; tail -5 "$out_dir/$tag.log" >&2; exit 1; }
                jq -s -c --arg model "$model" --arg mode "$mode" --arg rate "$rate" \
                    --argjson n "$n" --argjson warmup "$warmup" \
                    --argjson tx "$(jq '[.netns_bytes[].tx] | add / length' "$out_dir/$tag.counters.json")" '
                    def median: sort | if length == 0 then 0 else .[(length / 2 | floor)] end;
                    [.[] | select(.type == "step")] | (length) as $all | .[$warmup:] as $s |
                    {model: $model, mode: $mode, rate: $rate, ranks: $n, steps: ($s | length),
                     step_s: ($s | map(.step_s) | median),
                     compute_s: ($s | map(.compute_s) | median),
                     comm_wait_s: ($s | map(.comm.comm_wait_s // 0) | median),
                     quant_s: ($s | map(.comm.quant_s // 0) | median),
                     comm_s: ($s | map(.comm.comm_s // 0) | median),
                     bytes_sent: ($s | map(.comm.bytes_sent // 0) | median),
                     measured_tx_per_step: (if $all > 0 then $tx / $all else 0 end)} |
                    . + {img_per_s: ($n * 64 / .step_s)}' "$out_dir/$tag.jsonl" | tee -a "$results"
            done
            if [ "$model" = mlp2048 ]; then torch_ddp "$model" "$rate" "$n" "$steps" "$warmup"; fi
        done
    done
done

"$py" - "$results" "$ROOT/experiments/plots" "$quick" > "$out_dir/table.md" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
plots, quick = sys.argv[2], sys.argv[3] == "1"
print("| model | link | ranks | all-reduce | img/s | step ms | compute ms | comm wait ms | quantize ms | collectives ms | MB sent/rank (modelled) | MB tx/rank/step (measured, run / steps) | int4 speed-up | x torch fp32 | x torch fp16 |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
key = lambda r: (r["model"], r["rate"], r["ranks"])
by = {(key(r), r["mode"]): r for r in rows}
def ms(r, k):
    return f'{1e3 * r[k]:.1f}' if k in r else "-"
def ratio(ref, r):
    return f'{ref["step_s"] / r["step_s"]:.2f}x' if ref and "step_s" in ref else ""
for r in rows:
    if "skipped" in r:
        print(f'| {r["model"]} | {r["rate"]} | {r["ranks"]} | {r["mode"]} | skipped: {r["skipped"]} |'
              + " |" * 10)
        continue
    ours = not r["mode"].startswith("torch")
    up = ratio(by.get((key(r), "fp32")), r) if r["mode"] == "int4" else ""
    tf = ratio(by.get((key(r), "torch-fp32")), r) if ours else ""
    th = ratio(by.get((key(r), "torch-fp16")), r) if ours else ""
    mb = f'{r["bytes_sent"]/1e6:.2f}' if "bytes_sent" in r else "-"
    print(f'| {r["model"]} | {r["rate"]} | {r["ranks"]} | {r["mode"]} | {r["img_per_s"]:.0f} | '
          f'{ms(r, "step_s")} | {ms(r, "compute_s")} | {ms(r, "comm_wait_s")} | '
          f'{ms(r, "quant_s")} | {ms(r, "comm_s")} | {mb} | '
          f'{r.get("measured_tx_per_step", 0)/1e6:.2f} | {up} | {tf} | {th} |')
if any(r["mode"].startswith("torch") and "torch" in r for r in rows):
    v = next(r["torch"] for r in rows if "torch" in r)
    print(f"\ntorch-fp32 / torch-fp16: PyTorch {v} DDP over gloo (experiments/ddp_torch.py), fp32 "
          "all-reduce / fp16 compression hook; compute = its steps under no_sync().")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("\n(matplotlib missing: no plots)", file=sys.stderr)
    sys.exit(0)
suffix = "_quick" if quick else ""
for model in sorted({r["model"] for r in rows}):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for rate in sorted({r["rate"] for r in rows}):
        for mode, style in (("fp32", "--"), ("int4", "-"), ("torch-fp32", ":"),
                            ("torch-fp16", "-.")):
            pts = sorted((r["ranks"], r["img_per_s"]) for r in rows
                         if "skipped" not in r and r["model"] == model and r["rate"] == rate and r["mode"] == mode)
            if pts:
                axes[0].plot(*zip(*pts), style, marker="o", label=f"{mode}, {rate}")
    axes[0].set_xlabel("ranks"); axes[0].set_ylabel("img/s (64 images per rank)")
    axes[0].set_title(f"{model}: weak scaling"); axes[0].legend(); axes[0].grid(alpha=0.3)
    sel = [r for r in rows if r["model"] == model and "skipped" not in r]
    labels = [f'{r["mode"]}\n{r["ranks"]}r {r["rate"].replace("gbit", "G")}' for r in sel]
    bottom = [0.0] * len(sel)
    for part, name in (("compute_s", "compute"), ("comm_wait_s", "comm wait")):
        # torch rows: comm wait = step - compute (no_sync steps)
        vals = [1e3 * r.get(part, r["step_s"] - r["compute_s"]) for r in sel]
        axes[1].bar(range(len(sel)), vals, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[1].set_xticks(range(len(sel))); axes[1].set_xticklabels(labels, fontsize=6)
    axes[1].set_ylabel("ms per step (median)"); axes[1].set_title(f"{model}: step time")
    axes[1].legend(); fig.tight_layout()
    fig.savefig(f"{plots}/scaling_{model}{suffix}.png", dpi=110)
PY
cat "$out_dir/table.md"
# The headline figures: mlp2048, 4 ranks, 1gbit (nulls where a row was not run).
headline=$(jq -s -c '
    def step(m): (map(select(.model == "mlp2048" and .rate == "1gbit" and .ranks == 4 and
                             .mode == m and .step_s != null)) | first | .step_s) // null;
    def ratio(a; b): if a != null and b != null then a / b else null end;
    {experiment: "scaling", int4_step_s: step("int4"), fp32_step_s: step("fp32"),
     torch_fp32_step_s: step("torch-fp32"), torch_fp16_step_s: step("torch-fp16")} |
    . + {int4_x_torch_fp32: ratio(.torch_fp32_step_s; .int4_step_s),
         int4_x_torch_fp16: ratio(.torch_fp16_step_s; .int4_step_s),
         fp32_x_torch_fp32: ratio(.torch_fp32_step_s; .fp32_step_s)}' "$results")
if [ "$quick" = 1 ]; then echo "$headline"; exit 0; fi
block=$(printf '<!-- scaling:begin -->\nCommand: `experiments/scaling.sh` (%s, %s cores; results in runs/scaling/results.jsonl; plots experiments/plots/scaling_*.png)\n\n%s\n<!-- scaling:end -->' \
        "$(date -u +%Y-%m-%d)" "$(nproc)" "$(cat "$out_dir/table.md")")
res="$ROOT/experiments/RESULTS.md"
if grep -q '<!-- scaling:begin -->' "$res"; then
    "$py" - "$res" "$block" <<'PY'
import re, sys
p, b = sys.argv[1], sys.argv[2]
s = open(p).read()
open(p + ".tmp", "w").write(re.sub(r"<!-- scaling:begin -->.*?<!-- scaling:end -->", lambda m: b, s, flags=re.S))
PY
    mv "$res.tmp" "$res"
else
    printf '\n%s\n' "$block" >> "$res"
fi
echo "$headline"
