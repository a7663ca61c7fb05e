#!/usr/bin/env bash
# The README's test command: installs what is missing, builds, and runs the whole ctest suite
# (labels cpu, mpi, cuda; cuda tests skip without a GPU). Extra arguments go to ctest,
# e.g. launch/test.sh -L cpu
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
int4ddp_setup
int4ddp_build
cd "$INT4DDP_BUILD"
ctest --output-on-failure -j "$(nproc 2>/dev/null || echo 2)" --timeout 600 "$@"
