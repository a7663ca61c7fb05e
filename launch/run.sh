#!/usr/bin/env bash
# The README's main command: installs what is missing, builds int4ddp for this machine, trains the
# default config (configs/default.yaml: cnn, W/A/G 4/4/4, lbt, Fashion-MNIST) and prints the final
# test accuracy. Metrics and checkpoints go to runs/default/. Extra arguments are passed to
# `int4ddp train`, e.g. launch/run.sh --set train.epochs=1
# Data parallel: INT4DDP_RANKS ranks (default 2) under mpirun, one compute thread each.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
int4ddp_setup dataset-fashion-mnist
INT4DDP_TARGETS=int4ddp int4ddp_build
cd "$INT4DDP_ROOT"
exec launch/mpirun.sh -np "${INT4DDP_RANKS:-2}" -- int4ddp train --config configs/default.yaml \
    --set train.overwrite=true "$@"
