#!/usr/bin/env bash
# The README's main command. Training arrives with the training-engine issue; until then this sets
# up, builds, and demonstrates the quantizer on a synthetic heavy-tailed gradient stream.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
int4ddp_setup
int4ddp_build
out="$INT4DDP_BUILD/demo"
mkdir -p "$out"
"$INT4DDP_BUILD/experiments/gen_grads" "$out/grads.f32" --count $((1 << 16)) --steps 8 --dist student
"$INT4DDP_BUILD/int4ddp" quantize --input "$out/grads.f32" --count $((1 << 16)) --bits 4 \
    --policy lbt --rounding stochastic --output "$out/grads.q4.f32"
