#!/usr/bin/env bash
# experiments/gpu_math_check.sh: the GPU math check of kernels/math/cuda in one call (for
# gpu_check.sh to call, or alone on the GPU machine):
#   1. configure (if BUILD has no cache yet) and build test_cuda_math and bench_gpu_math;
#   2. test_cuda_math: every kernel against the CPU definitions (integer GEMM bit for bit on both
#      paths, sgemm and BatchNorm within their stated bounds, determinism). A skipped test counts
#      as a failure here: on the GPU machine nothing may skip;
#   3. bench_gpu_math: int8 tensor-core GEMM vs fp32 (and TF32) at resnet18's convolution GEMMs.
# Output under $OUT (default ./gpu_out): gpu_math_check.log, test_cuda_math.log,
# bench_gpu_math.log. The last line is one JSON object:
#   {"check":"gpu_math","tests":"pass"|"fail","bench":<bench_gpu_math's JSON line, or null>}
# Exit status: 2 without a GPU (nothing else runs), 1 when a step failed, else 0.
# Environment: BUILD (default build-gpu), OUT, JOBS (default 16), BATCH (default 256).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
BUILD=${BUILD:-build-gpu}
OUT=${OUT:-./gpu_out}
JOBS=${JOBS:-16}
BATCH=${BATCH:-256}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PATH=/usr/local/cuda/bin:$PATH
exec > >(tee "$OUT/gpu_math_check.log") 2>&1
log() { echo "[gpu_math_check] $*"; }

if ! nvidia-smi -L 2>/dev/null | grep -q "^GPU "; then
  log "FAILED: no GPU found (nvidia-smi lists none): this check needs a CUDA device"
  echo '{"check":"gpu_math","tests":"no_gpu","bench":null}'
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

status=0
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  log "configure $BUILD"
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DINT4DDP_NATIVE=ON -DINT4DDP_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/gpu_math_configure.log" 2>&1 ||
    { log "FAILED: configure (see $OUT/gpu_math_configure.log)"; tail -20 "$OUT/gpu_math_configure.log"; exit 1; }
fi
log "build test_cuda_math bench_gpu_math"
if ! cmake --build "$BUILD" -j "$JOBS" --target test_cuda_math bench_gpu_math \
    > "$OUT/gpu_math_build.log" 2>&1; then
  log "FAILED: build (see $OUT/gpu_math_build.log)"
  tail -30 "$OUT/gpu_math_build.log"
  exit 1
fi

log "test_cuda_math"
tests=pass
"$BUILD/tests/test_cuda_math" > "$OUT/test_cuda_math.log" 2>&1 || tests=fail
tail -25 "$OUT/test_cuda_math.log"
if grep -q "SKIPPED" "$OUT/test_cuda_math.log"; then
  log "FAILED: tests skipped on a GPU machine"
  tests=fail
fi
[ "$tests" = pass ] || { log "FAILED: test_cuda_math"; status=1; }

log "bench_gpu_math --batch $BATCH"
bench=null
if "$BUILD/experiments/bench_gpu_math" --batch "$BATCH" > "$OUT/bench_gpu_math.log" 2>&1; then
  :
else
  log "FAILED: bench_gpu_math (exit $?)"
  status=1
fi
cat "$OUT/bench_gpu_math.log"
last=$(tail -n 1 "$OUT/bench_gpu_math.log")
case "$last" in \{*\}) bench=$last ;; esac
echo "{\"check\":\"gpu_math\",\"tests\":\"$tests\",\"bench\":$bench}"
exit $status
