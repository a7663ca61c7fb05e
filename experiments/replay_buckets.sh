#!/usr/bin/env bash
# experiments/replay_buckets.sh: which bucket interval policy gives the smallest error of the
# all-reduced mean on real gradients (issue 14 item 1, DESIGN.md section 4).
#
# 1. record: short 4-rank trainings of cnn (4/4/4), resnet20 (4/4/4) and the mlp with two 2048-wide
#    layers (configs/mlp2048.yaml) on Fashion-MNIST write every rank's real weight-gradient buckets
#    (comm.dump_buckets_every) into runs/bucket_dumps/<model>/ (ignored by git). Skipped for a
#    model whose folder already holds dumps (--record forces it).
# 2. replay: build/experiments/replay_buckets runs each model's dumps, in step order, through the
#    4-rank two-shot (the TwoShotAllreduce the trainer uses, on a simulated in-process
#    communicator) at equal bytes (INT4, G = 512) for each policy, with and without error
#    feedback, and prints the relative error of the all-reduced mean against the exact fp32 mean.
#    The first --skip dumps (default 4: steps 0-15, where the gradient norm still falls 20x between
#    dumps) are replayed, so that error feedback has a state, but not scored.
#
# Usage: experiments/replay_buckets.sh [--record] [--steps S] [--every K] [--skip D]
#                                      [--models "cnn resnet20 mlp2048"] [--policies LIST]
# About 4 minutes of recording and 10 of replay on the 2-core development VM; 1.3 GB of dumps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/common.sh"
record=0
steps=60
every=5
models="cnn resnet20 mlp2048"
skip=4
policies=()
while [ $# -gt 0 ]; do
    case "$1" in
        --record) record=1 ;;
        --steps) steps="$2"; shift ;;
        --every) every="$2"; shift ;;
        --models) models="$2"; shift ;;
        --skip) skip="$2"; shift ;;
        --policies) policies=(--policies "$2"); shift ;;
        *) echo "usage: experiments/replay_buckets.sh [--record] [--steps S] [--every K] [--skip D] [--models LIST] [--policies LIST]" >&2; exit 2 ;;
    esac
    shift
done
int4ddp_setup
INT4DDP_TARGETS="int4ddp replay_buckets" int4ddp_build >/dev/null
dumps="$ROOT/runs/bucket_dumps"
mkdir -p "$dumps"

for m in $models; do
    dir="$dumps/$m"
    if [ "$record" = 1 ] || ! ls "$dir"/*.bkt >/dev/null 2>&1; then
        echo "== record $m: 4 ranks, $steps steps, buckets every $every steps -> $dir"
        # 32 images per rank (global batch 128, the recipe's) for the conv nets; mlp2048 keeps its
        # config's 64 per rank (experiments/scaling.sh's setting).
        batch=()
        [ "$m" = mlp2048 ] || batch=(--set train.batch_size=32)
        "$ROOT/launch/mpirun.sh" -np 4 -- int4ddp train --config "$ROOT/configs/$m.yaml" \
            "${batch[@]}" --set train.max_steps="$steps" --set comm.dump_buckets_every="$every" \
            --set comm.dump_buckets_dir="$dir" --set train.overwrite=true --set train.threads=1 \
            --set log.progress=off --set train.checkpoint_every_epochs=0 \
            --set train.checkpoint_dir="$dumps/ck_$m" --set log.metrics_path="$dumps/$m.jsonl" \
            > "$dumps/$m.log" 2>&1 || { echo "recording $m failed; see $dumps/$m.log" >&2; tail -5 "$dumps/$m.log" >&2; exit 1; }
    fi
done

for m in $models; do
    echo "== replay $m"
    "$ROOT/launch/mpirun.sh" -np 4 -- "$INT4DDP_BUILD/experiments/replay_buckets" \
        --dir "$dumps/$m" --skip "$skip" "${policies[@]}"
done
