#!/usr/bin/env bash
# The README's main command: installs what is missing, builds int4ddp for this machine, trains the
# default config (configs/default.yaml: cnn, W/A/G 4/4/4, lbt, Fashion-MNIST) and prints the final
# test accuracy. Metrics and checkpoints go to runs/default/. Extra arguments are passed to
# `int4ddp train`, e.g. launch/run.sh --set train.epochs=1
# Single process for now: data-parallel training under mpirun arrives with the data-parallel issue.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
int4ddp_setup dataset-fashion-mnist
INT4DDP_TARGETS=int4ddp int4ddp_build
cd "$INT4DDP_ROOT"
"$INT4DDP_BUILD/int4ddp" train --config configs/default.yaml "$@"
