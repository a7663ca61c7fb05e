#!/usr/bin/env bash
# experiments/gpu_check.sh: the whole GPU check in one call (DESIGN.md section 7) on the lent
# H100/H200 machine, inside a time budget (BUDGET_S, default 570 s: the device call's limit is
# 600 s). Every step's timeout is capped by the time left, and a step with too little time left is
# skipped and reported as a failure, so the summaries at the end are always written. In order of
# importance:
#   1. configure + build (Release, -DINT4DDP_NATIVE=ON, sm_90 only, only the targets needed,
#      -j$JOBS), with the PyTorch baseline (eager and torch.compile INT4 quantize+pack and
#      unpack+dequantize of 2^28 floats, per-block G = 512, and per-tensor quantize+pack) running
#      meanwhile (CPU-bound compile, GPU otherwise idle);
#   2. ctest -L cuda (codec vs CPU reference, owner step, device all-reduce vs host, device
#      BucketEngine, errors; the suites of the steps below excluded, they run once, there), and the
#      CPU codec tests on this machine's CPU (its AVX-512 codec, which the dev machines lack);
#   3. the GPU training engine (train.device = cuda): test_cuda_layers and test_cuda_quant_layers
#      with no skip allowed (every CUDA layer, fp32 and quantized, against its CPU layer; the
#      device optimizer; 100-step GPU trainings against the CPU loss curves; GPU rerun and resume
#      bit for bit; CPU checkpoint -> GPU -> CPU), the device BucketEngine staged over MPI with 2
#      ranks against the host engine;
#   4. experiments/gpu_math_check.sh: the GPU math of the training engine (kernels/math/cuda)
#      against the CPU with no skip allowed, and the int8 tensor-core GEMM beside fp32/TF32 at
#      resnet18's shapes;
#   5. bench_gpu kernels: copy, quantize+pack (G = 512 stochastic and nearest; per tensor, two
#      passes), unpack+dequantize, owner step N = 2, 4, 8 on 2^28 floats, each as a fraction of
#      the copy in the same run, beside the PyTorch figures of step 1: gpu.json;
#   6. on Fashion-MNIST: cnn fp32 and cnn 4/4/4 lbt 100 steps on the GPU and on the CPU (loss
#      curves compared), the default config (cnn 4/4/4 lbt, its whole schedule) on the GPU beside
#      the CPU (test accuracy within 0.3 points), 2 GPU epochs of cnn fp32, 200 fp32 resnet20
#      steps (img/s), mpirun -np 2 GPU ranks sharing the GPU through staged MPI with the int4 and
#      the fp32 all-reduce (accuracy within 0.3 points), comm.backend = nccl with 2 ranks on one
#      GPU (must fail on every rank, no hang); the CPU references, the default config and the
#      mpirun runs go in the background beside the short GPU runs. Data: $FMNIST, else
#      ./data/fashion-mnist (an ignored folder: copy the four .gz files there and carry it with
#      the device call), else /usr/share/datasets/fashion-mnist. Results: gpu_train.json;
#   7. bench_train --device cuda (resnet20 batch 128 1x28x28, resnet18 batch 256 3x32x32; fp32 and
#      4/4/4) beside PyTorch eager on the same GPU (bench_train_torch.py: fp32 and AMP bf16; TF32
#      off on both sides): bench_train_gpu.json;
#   8. the device all-reduce vs the host one under mpirun with 2 and 4 ranks sharing the GPU
#      (MPI staged through pinned host memory), and NCCL with one rank, as tests and benchmarks;
#   9. PyTorch torch.compile training (its compilation takes minutes) while the budget allows,
#      added to bench_train_gpu.json.
# Everything goes under $OUT (default ./gpu_out): gpu_check.log (this output), per-step logs,
# torch.json, gpu_train.json, bench_train_gpu.json, gpu.json. The last line of the output is the
# JSON line of bench_gpu kernels:
#   {"bench":"gpu","gpu":..,"copy_GBps":..,"quant_GBps":..,"dequant_GBps":..,
#    "owner_GBps":{"2":..,"4":..,"8":..},"torch_compile_quant_ms":..,"quant_ms":..,
#    "quant_pct_copy":..,"dequant_pct_copy":..,"tensor_quant_pct_copy":..,"owner8_pct_copy":..,
#    "quant_x_torch_compile":..,"dequant_x_torch_compile":..,...}
# Environment: OUT, BUILD (default build-gpu), JOBS (build jobs, default 16), FMNIST, BUDGET_S
# (seconds for the whole script, default 570: about 30 s under the device call's timeout_s; the
# JSON summaries are written as their steps end, so even a call cut short returns what ran).
# Exit status: non-zero when a step failed or was skipped (the remaining steps still run and log).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-./gpu_out}
BUILD=${BUILD:-build-gpu}
JOBS=${JOBS:-16}
BUDGET_S=${BUDGET_S:-570}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PATH=/usr/local/cuda/bin:$PATH
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
status=0
t_start=$(date +%s)
deadline=$((t_start + BUDGET_S))
log() { echo "[gpu_check +$(($(date +%s) - t_start))s] $*"; }
fail() { log "FAILED: $*"; status=1; }
# budget NOMINAL WHAT [RESERVE]: sets T, the step's timeout: NOMINAL seconds, capped so that RESERVE
# seconds (default 15: the summaries) stay for what follows. False, and a failure, when under 10 s.
budget() {
  local left=$((deadline - $(date +%s) - ${3:-15}))
  T=$(($1 < left ? $1 : left))
  if ((T < 10)); then
    fail "$2: skipped (time budget: ${left}s left of ${BUDGET_S}s)"
    return 1
  fi
}
# The steps before the kernel benchmark keep this much for it.
KERNEL_RESERVE=60
# gtest_ok LOG WHAT [RANKS]: the gtest log of RANKS processes (default 1) passed, ran at least one
# test in each and skipped none (nothing may skip on the GPU machine). Not anchored at the line's
# start: mpirun may interleave the ranks' output.
gtest_ok() {
  local log=$1 what=$2 ranks=${3:-1} passed
  passed=$(grep -cE '\[  PASSED  \] [1-9][0-9]* test' "$log")
  if ((passed != ranks)); then
    fail "$what: $passed of $ranks process(es) report passed tests (see $(basename "$log"))"
  elif grep -qE '\[  (SKIPPED|FAILED)  ?\]' "$log"; then
    fail "$what: skipped or failed tests on the GPU machine (see $(basename "$log"))"
  fi
  grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$log" | sort | uniq -c
}

exec > >(tee "$OUT/gpu_check.log") 2>&1

log "machine (budget ${BUDGET_S}s)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
nvcc --version | tail -2
cmake --version | head -1

# ---- PyTorch baseline, in the background during the build -------------------------------------
cat > "$OUT/torch_baseline.py" <<'PY'
# INT4 per-block (G = 512) quantize+pack and unpack+dequantize of 2^28 floats in PyTorch, eager and
# torch.compile, and per-tensor quantize+pack (one scale): the baseline of DESIGN.md section 7, the
# same operations as bench_gpu's rows (multiply by r = L / c, stochastic rounding). Prints one JSON
# object; null where torch or CUDA is missing or a variant failed.
import json, sys
res = {"torch": None, "eager_quant_ms": None, "compile_quant_ms": None,
       "eager_dequant_ms": None, "compile_dequant_ms": None,
       "eager_tensor_ms": None, "compile_tensor_ms": None, "error": None}
try:
    import torch
    res["torch"] = torch.__version__
    assert torch.cuda.is_available(), "no CUDA in torch"
    n, G, L = 1 << 28, 512, 7

    def quant(x):
        xb = x.view(-1, G)
        c = xb.abs().amax(dim=1, keepdim=True)
        q = torch.floor(xb * (L / c) + torch.rand_like(xb)).clamp_(-L, L).to(torch.int8).view(-1, 2)
        packed = ((q[:, 0] & 0xF) | ((q[:, 1] & 0xF) << 4)).to(torch.uint8)
        return packed, c / L

    def quant_tensor(x):
        c = x.abs().amax()
        q = torch.floor(x * (L / c) + torch.rand_like(x)).clamp_(-L, L).to(torch.int8).view(-1, 2)
        packed = ((q[:, 0] & 0xF) | ((q[:, 1] & 0xF) << 4)).to(torch.uint8)
        return packed, c / L

    def dequant(packed, d):
        p = packed.to(torch.int16)
        lo = ((p & 0xF) ^ 8) - 8
        hi = (((p >> 4) & 0xF) ^ 8) - 8
        q = torch.stack((lo, hi), dim=1).view(-1, G).to(torch.float32)
        return (q * d).view(-1)

    def best_ms(f, *args, reps=10):
        f(*args)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = 1e30
        for _ in range(reps):
            a.record(); f(*args); b.record(); b.synchronize()
            best = min(best, a.elapsed_time(b))
        return best

    x = torch.randn(n, device="cuda")
    with torch.no_grad():
        res["eager_quant_ms"] = best_ms(quant, x)
        packed, d = quant(x)
        res["eager_dequant_ms"] = best_ms(dequant, packed, d)
        res["eager_tensor_ms"] = best_ms(quant_tensor, x)
        try:
            cq, cd = torch.compile(quant), torch.compile(dequant)
            res["compile_quant_ms"] = best_ms(cq, x)
            res["compile_dequant_ms"] = best_ms(cd, packed, d)
            res["compile_tensor_ms"] = best_ms(torch.compile(quant_tensor), x)
        except Exception as e:  # compile toolchain missing: keep the eager figures
            res["error"] = "torch.compile: %s" % (str(e).splitlines() or [""])[0][:300]
except Exception as e:
    res["error"] = (str(e).splitlines() or [repr(e)])[0][:300]
print(json.dumps(res))
PY
log "PyTorch baseline (background)"
( timeout 240 python3 "$OUT/torch_baseline.py" > "$OUT/torch.json" 2> "$OUT/torch.err" \
    || echo '{"error":"python3 failed or timed out"}' > "$OUT/torch.json" ) &
torch_pid=$!

# ---- 1. build ----------------------------------------------------------------------------------
# NCCL: the CUDA toolkit's, the system's, or (if neither) a pip wheel's (nvidia-nccl-cu*).
if [[ -z "${NCCL_HOME:-}" && ! -e /usr/local/cuda/include/nccl.h && ! -e /usr/include/nccl.h ]]; then
  wheel=$(python3 -c 'import nvidia.nccl, os; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null) \
    && [[ -n "$wheel" ]] && export NCCL_HOME=$wheel && log "NCCL from the pip wheel at $wheel"
fi
log "configure"
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DINT4DDP_NATIVE=ON -DINT4DDP_CUDA=ON \
  -DINT4DDP_NCCL=AUTO -DCMAKE_CUDA_ARCHITECTURES=90 -DINT4DDP_BUILD_TESTS=ON \
  -DINT4DDP_BUILD_EXPERIMENTS=ON > "$OUT/configure.log" 2>&1 || fail "configure (see configure.log)"
grep 'int4ddp:' "$OUT/configure.log"
log "build (-j$JOBS)"
if budget 420 build $KERNEL_RESERVE; then
  timeout "$T" cmake --build "$BUILD" -j"$JOBS" --target test_cuda_codec test_cuda_two_shot \
    bench_gpu test_codec test_codec_definition test_cuda_math bench_gpu_math test_cuda_layers \
    int4ddp test_cuda_quant_layers test_cuda_buckets bench_train \
    > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; fail "build (see build.log)"; }
fi

# ---- 2. tests ----------------------------------------------------------------------------------
# Suites that run once below, not here: Gpu* and CudaQuant* (test_cuda_layers,
# test_cuda_quant_layers, step 3) and test_cuda_math's (gpu_math_check.sh, step 4), parameterized
# ones included (ctest names them PREFIX/Suite.Test/param, e.g. Paths/CudaIntGemmPaths...).
log "ctest -L cuda (codec, two-shot, buckets)"
if budget 240 "ctest -L cuda" $KERNEL_RESERVE; then
  ( cd "$BUILD" && timeout "$T" ctest -L cuda --output-on-failure -j4 -E \
    '^([A-Za-z]+/)?(Gpu[A-Za-z]*|CudaQuant[A-Za-z]*|CudaBatchNorm|CudaConvColumns|CudaDeterminism|CudaIntGemm[A-Za-z]*|CudaLayers|CudaOptim|CudaSgemm)\.' ) \
    > "$OUT/ctest_cuda.log" 2>&1 || fail "ctest -L cuda (see ctest_cuda.log)"
  grep -E 'tests passed|tests failed|\(Failed\)|Not Run|Skipped|Timeout' "$OUT/ctest_cuda.log" | head -20
  grep -qE '^No tests were found|[*]+Skipped|Not Run' "$OUT/ctest_cuda.log" \
    && fail "ctest -L cuda: no tests, or tests skipped on the GPU machine (see ctest_cuda.log)"
fi
# The CPU codec on this machine's CPU (often the only AVX-512 one a session gets): every ISA it
# has against the reference and the DESIGN.md text.
log "CPU codec tests (AVX-512 where this CPU has it)"
grep -o -m1 -w 'avx512f' /proc/cpuinfo || echo "no avx512f on this CPU"
for t in test_codec test_codec_definition; do
  budget 120 "$t" $KERNEL_RESERVE || continue
  timeout "$T" "$BUILD/tests/$t" --gtest_color=no > "$OUT/$t.log" 2>&1 || fail "$t (see $t.log)"
  grep -E '^\[  (PASSED|FAILED) ' "$OUT/$t.log"
done

# ---- 3. the GPU training engine (train.device = cuda): layers, model, optimizer, trainings ------
log "GPU layers and trainings: test_cuda_layers (nothing may skip on the GPU machine)"
# NoGpuIsAClearErrorNamingTheRank is the one test that skips where a GPU is present.
if budget 240 test_cuda_layers $KERNEL_RESERVE; then
  timeout "$T" "$BUILD/tests/test_cuda_layers" --gtest_color=no --gtest_filter='-GpuErrors.NoGpu*' \
    > "$OUT/test_cuda_layers.log" 2>&1 || fail "test_cuda_layers (see test_cuda_layers.log)"
  gtest_ok "$OUT/test_cuda_layers.log" test_cuda_layers
fi
log "quantized GPU layers: test_cuda_quant_layers (nothing may skip)"
if budget 180 test_cuda_quant_layers $KERNEL_RESERVE; then
  timeout "$T" "$BUILD/tests/test_cuda_quant_layers" --gtest_color=no \
    > "$OUT/test_cuda_quant_layers.log" 2>&1 || fail "test_cuda_quant_layers (see test_cuda_quant_layers.log)"
  gtest_ok "$OUT/test_cuda_quant_layers.log" test_cuda_quant_layers
fi
log "mpirun -np 2: the device BucketEngine staged over MPI vs the host engine"
if budget 150 "mpirun -np 2 test_cuda_buckets" $KERNEL_RESERVE; then
  timeout "$T" "${MPIRUN[@]}" -np 2 "$BUILD/tests/test_cuda_buckets" \
    --gtest_filter='CudaBuckets.Staged*:CudaBuckets.Checkpoint*' --gtest_color=no \
    > "$OUT/test_cuda_buckets_np2.log" 2>&1 || fail "mpirun -np 2 test_cuda_buckets (see test_cuda_buckets_np2.log)"
  gtest_ok "$OUT/test_cuda_buckets_np2.log" "mpirun -np 2 test_cuda_buckets" 2
fi

# ---- 4. the GPU math of the training engine (kernels/math/cuda): gpu_math_check.sh runs
# test_cuda_math with "no skip allowed" and times the int8 tensor-core GEMM -----------------------
log "GPU math: experiments/gpu_math_check.sh"
if budget 240 gpu_math_check.sh $KERNEL_RESERVE; then
  JOBS="$JOBS" BUILD="$BUILD" OUT="$OUT" timeout "$T" bash experiments/gpu_math_check.sh \
    > "$OUT/gpu_math_stdout.log" 2>&1 || fail "gpu_math_check.sh (see gpu_math_check.log)"
  tail -1 "$OUT/gpu_math_stdout.log"
fi

# ---- 5. kernel benchmarks (gpu.json; its JSON line also ends the output) -----------------------
log "waiting for the PyTorch baseline"
wait "$torch_pid"
cat "$OUT/torch.json"
torch_field() {
  python3 -c 'import json,sys
try: v=json.load(open(sys.argv[1])).get(sys.argv[2])
except Exception: v=None
print(-1 if v is None else v)' "$OUT/torch.json" "$1" 2>/dev/null || echo -1
}
log "kernels, 2^28 floats"
echo '{"bench":"gpu","error":"no result"}' > "$OUT/gpu.json"
if budget 150 "bench_gpu kernels"; then
  timeout "$T" "$BUILD/experiments/bench_gpu" kernels --log2n 28 --reps 20 \
    --torch-eager-ms "$(torch_field eager_quant_ms)" --torch-compile-ms "$(torch_field compile_quant_ms)" \
    --torch-eager-dequant-ms "$(torch_field eager_dequant_ms)" \
    --torch-compile-dequant-ms "$(torch_field compile_dequant_ms)" \
    --torch-eager-tensor-ms "$(torch_field eager_tensor_ms)" \
    --torch-compile-tensor-ms "$(torch_field compile_tensor_ms)" > "$OUT/bench_kernels.log" 2>&1 \
    || fail "bench_gpu kernels (see bench_kernels.log)"
  grep -v '^{' "$OUT/bench_kernels.log"
  tail -1 "$OUT/bench_kernels.log" | grep '^{' > "$OUT/gpu.json.tmp" && mv "$OUT/gpu.json.tmp" "$OUT/gpu.json"
  rm -f "$OUT/gpu.json.tmp"
fi
cat "$OUT/gpu.json"

# ---- 6. trainings on Fashion-MNIST (gpu_train.json) --------------------------------------------
train_json() {
  python3 - "$OUT" <<'PY'
# The GPU runs beside the CPU run: step losses of the first 100 steps, final accuracies, img/s.
import json, os, sys
out = sys.argv[1]
def records(name):
    path = os.path.join(out, "train_%s.jsonl" % name)
    try:
        return [json.loads(l) for l in open(path)]
    except Exception:
        return []
def losses(r): return {x["batch"]: x["loss"] for x in r if x.get("type") == "step"}
def final(r): return next((x for x in r if x.get("type") == "final"), {})
def max_gap(a, b):
    la, lb = losses(records(a)), losses(records(b))
    common = sorted(set(la) & set(lb))
    return len(common), max((abs(la[s] - lb[s]) for s in common), default=None)
def acc(name):
    v = final(records(name)).get("test_accuracy")
    return None if v is None else float(v)
def gap(a, b):
    x, y = acc(a), acc(b)
    return None if x is None or y is None else round(100 * abs(x - y), 3)
n100, gap100 = max_gap("cnn_gpu_100", "cnn_cpu_100")
nq, gapq = max_gap("qcnn_gpu_100", "qcnn_cpu_100")
res = {"check": "gpu_train",
       "steps_compared": n100, "max_abs_loss_diff_100": gap100,
       "q444_steps_compared": nq, "q444_max_abs_loss_diff_100": gapq,
       "gpu_100": final(records("cnn_gpu_100")), "cpu_100": final(records("cnn_cpu_100")),
       "gpu_2ep": final(records("cnn_gpu_2ep")),
       "default_gpu": final(records("default_gpu")), "default_cpu": final(records("default_cpu")),
       "default_gpu_vs_cpu_points": gap("default_gpu", "default_cpu"),
       "np2_int4": final(records("cnn_gpu_np2_int4")), "np2_fp32": final(records("cnn_gpu_np2_fp32")),
       "np2_int4_vs_fp32_points": gap("cnn_gpu_np2_int4", "cnn_gpu_np2_fp32"),
       "resnet20_gpu_200": final(records("resnet20_gpu_200"))}
print(json.dumps(res))
PY
}
# Checkpoints stay out of $OUT: they are not needed back, and $OUT must stay small to come back.
CK=$BUILD/gpu_check_ck
FMNIST=${FMNIST:-}
for d in "$FMNIST" ./data/fashion-mnist /usr/share/datasets/fashion-mnist; do
  if [[ -n "$d" && -e "$d/train-images-idx3-ubyte.gz" ]]; then FMNIST=$(cd "$d" && pwd); break; fi
done
if [[ -z "$FMNIST" || ! -e "$FMNIST/train-images-idx3-ubyte.gz" ]]; then
  fail "no Fashion-MNIST (set FMNIST or carry data/fashion-mnist): GPU training skipped"
else
  # The trainings keep TRAIN_RESERVE seconds for step 7 (ours and PyTorch eager, both models).
  TRAIN_RESERVE=100
  train_run() {  # config name device extra --set arguments...
    local config=$1 name=$2 device=$3
    shift 3
    budget 200 "training $name" $TRAIN_RESERVE || return 0
    timeout "$T" "$BUILD/int4ddp" train --config "$config" --set "data.path=$FMNIST" \
      --set comm.backend=none --set train.checkpoint_every_epochs=0 --set log.progress=off \
      --set log.print_every=1 --set train.overwrite=true --set "train.device=$device" \
      --set "train.checkpoint_dir=$CK/ck_$name" --set "log.metrics_path=$OUT/train_$name.jsonl" \
      "$@" > "$OUT/train_$name.log" 2>&1 || fail "training $name (see train_$name.log)"
    tail -1 "$OUT/train_$name.log"
  }
  train_cnn() { train_run configs/cnn_fp32.yaml "$@"; }
  train_np2() {  # mode: 2 GPU ranks sharing the GPU, the all-reduce staged over MPI, 2 epochs
    local mode=$1
    budget 200 "mpirun -np 2 GPU training $mode" $TRAIN_RESERVE || return 0
    timeout "$T" "${MPIRUN[@]}" -np 2 "$BUILD/int4ddp" train --config configs/cnn_fp32.yaml \
      --set "data.path=$FMNIST" --set comm.backend=mpi --set "comm.mode=$mode" \
      --set train.epochs=2 --set train.checkpoint_every_epochs=0 --set log.progress=off \
      --set train.overwrite=true --set train.device=cuda \
      --set "train.checkpoint_dir=$CK/ck_np2_$mode" \
      --set "log.metrics_path=$OUT/train_cnn_gpu_np2_$mode.jsonl" \
      > "$OUT/train_cnn_gpu_np2_$mode.log" 2>&1 \
      || fail "mpirun -np 2 GPU training $mode (see train_cnn_gpu_np2_$mode.log)"
    grep -m1 'gradient buckets:' "$OUT/train_cnn_gpu_np2_$mode.log"
    tail -1 "$OUT/train_cnn_gpu_np2_$mode.log"
  }
  # Four groups run at once (their results do not depend on timing; the GPU and the 16 cores have
  # room): the CPU references on 8 threads (results do not depend on the thread count), the
  # default config on the GPU, the two mpirun -np 2 GPU trainings, and the short GPU runs in the
  # foreground. The resnet20 throughput run and step 7 follow once all are done.
  log "in the background: the CPU references (cnn fp32 and 4/4/4 100 steps, the default config)"
  (
    train_cnn cnn_cpu_100 cpu --set train.epochs=2 --set train.max_steps=100 --set train.threads=8
    train_run configs/cnn.yaml qcnn_cpu_100 cpu --set train.epochs=2 --set train.max_steps=100 \
      --set train.threads=8
    train_run configs/default.yaml default_cpu cpu --set train.threads=8
  ) > "$OUT/bg_cpu_references.log" 2>&1 &
  bg_pids=($!)
  log "in the background: the default config (cnn 4/4/4 lbt, whole schedule) on the GPU"
  train_run configs/default.yaml default_gpu cuda > "$OUT/bg_default_gpu.log" 2>&1 &
  bg_pids+=($!)
  log "in the background: mpirun -np 2 GPU ranks sharing the GPU, int4 then fp32 all-reduce"
  ( train_np2 int4; train_np2 fp32 ) > "$OUT/bg_np2.log" 2>&1 &
  bg_pids+=($!)
  log "cnn fp32 on Fashion-MNIST ($FMNIST): 100 steps on the GPU"
  train_cnn cnn_gpu_100 cuda --set train.epochs=2 --set train.max_steps=100
  log "cnn 4/4/4 lbt: 100 steps on the GPU"
  train_run configs/cnn.yaml qcnn_gpu_100 cuda --set train.epochs=2 --set train.max_steps=100
  log "cnn fp32, 2 GPU epochs"
  train_cnn cnn_gpu_2ep cuda --set train.epochs=2
  log "bad input: comm.backend = nccl with 2 ranks on one GPU must fail on every rank, no hang"
  if budget 120 "nccl with 2 ranks on one GPU" $TRAIN_RESERVE; then
    timeout "$T" "${MPIRUN[@]}" -np 2 "$BUILD/int4ddp" train --config configs/cnn_fp32.yaml \
      --set "data.path=$FMNIST" --set comm.backend=nccl --set comm.grad_policy=lbt \
      --set comm.mode=int4 --set train.device=cuda --set train.max_steps=5 \
      --set train.checkpoint_every_epochs=0 --set log.progress=off --set train.overwrite=true \
      --set "train.checkpoint_dir=$CK/ck_nccl" > "$OUT/train_nccl_np2.log" 2>&1
    nccl_rc=$?
    if [[ $nccl_rc -eq 0 || $nccl_rc -eq 124 ]]; then
      fail "nccl with 2 ranks on one GPU: exit $nccl_rc (expected a clear error; see train_nccl_np2.log)"
    else
      log "nccl with 2 ranks on one GPU refused (exit $nccl_rc): $(grep -m1 'int4ddp.*error' "$OUT/train_nccl_np2.log")"
    fi
  fi
  log "waiting for the background trainings"
  wait "${bg_pids[@]}"
  cat "$OUT/bg_cpu_references.log" "$OUT/bg_default_gpu.log" "$OUT/bg_np2.log"
  # fail() in a background job cannot set this shell's status: check the logs here.
  for name in cnn_cpu_100 qcnn_cpu_100 default_cpu default_gpu cnn_gpu_np2_int4 cnn_gpu_np2_fp32; do
    grep -q 'final test accuracy' "$OUT/train_$name.log" 2>/dev/null \
      || fail "training $name did not finish (see train_$name.log, bg_*.log)"
  done
  log "resnet20 fp32, 200 GPU steps (throughput of the first GPU engine, alone on the GPU)"
  train_run configs/resnet20.yaml resnet20_gpu_200 cuda --set train.epochs=2 \
    --set train.max_steps=200 --set quant.weight_bits=32 --set quant.activation_bits=32 \
    --set quant.grad_bits=32 --set comm.mode=fp32
fi
train_json > "$OUT/gpu_train.json" || fail "gpu_train.json"
cat "$OUT/gpu_train.json"

# ---- 7. training throughput beside PyTorch eager on the same GPU (bench_train_gpu.json) ---------
bench_train_json() {
  python3 - "$OUT" <<'PY'
# Ours beside PyTorch: img/s per model and variant, and the ratios the issue names.
import glob, json, os, sys
out = sys.argv[1]
def last_json(path):
    try:
        return next(json.loads(l) for l in reversed(open(path).read().splitlines()) if l.startswith("{"))
    except Exception:
        return None
res = {"check": "bench_train_gpu", "rows": {}}
for model, batch in (("resnet20", 128), ("resnet18", 256)):
    tag = "%s_b%d" % (model, batch)
    row = {}
    ours = last_json(os.path.join(out, "bench_train_gpu_%s.log" % tag)) or {"rows": []}
    for r in ours["rows"]:
        row["ours_" + ("fp32" if r["bits"] == "fp32" else "444")] = r["img_per_s"]
    for mode in ("eager", "compile"):
        t = last_json(os.path.join(out, "torch_train_%s_%s.log" % (mode, tag))) or {"rows": []}
        for r in t["rows"]:
            row["torch_%s_%s" % (mode, r["bits"])] = r["img_per_s"]
    def ratio(a, b):
        return round(row[a] / row[b], 3) if row.get(a) and row.get(b) else None
    row["fp32_x_torch_eager_fp32"] = ratio("ours_fp32", "torch_eager_fp32")
    row["q444_x_ours_fp32"] = ratio("ours_444", "ours_fp32")
    row["q444_x_torch_eager_bf16"] = ratio("ours_444", "torch_eager_bf16")
    res["rows"][model] = row
print(json.dumps(res))
PY
}
bench_pair() {  # model batch input
  local model=$1 batch=$2 input=$3 tag="$1_b$2"
  log "bench_train --device cuda: $model batch $batch $input"
  if budget 120 "bench_train --device cuda $model"; then
    timeout "$T" "$BUILD/experiments/bench_train" --device cuda --model "$model" --batch "$batch" \
      --input "$input" --steps 20 --reps 3 > "$OUT/bench_train_gpu_$tag.log" 2>&1 \
      || fail "bench_train --device cuda $model (see bench_train_gpu_$tag.log)"
    grep -v '^{' "$OUT/bench_train_gpu_$tag.log"
  fi
  log "PyTorch eager on the GPU: $model (fp32, AMP bf16)"
  budget 120 "PyTorch eager $model" || return 0
  timeout "$T" python3 experiments/bench_train_torch.py --device cuda --model "$model" \
    --batch "$batch" --input "$input" --precision fp32 --precision bf16 --steps 20 --reps 3 \
    > "$OUT/torch_train_eager_$tag.log" 2>&1 || echo "PyTorch eager failed (see torch_train_eager_$tag.log)"
  grep -v '^{' "$OUT/torch_train_eager_$tag.log" | tail -3
}
bench_pair resnet20 128 1x28x28
bench_pair resnet18 256 3x32x32
bench_train_json > "$OUT/bench_train_gpu.json" || fail "bench_train_gpu.json"
cat "$OUT/bench_train_gpu.json"

# ---- 8. device all-reduce: tests and benchmarks under mpirun, NCCL with one rank ----------------
for np in 2 4; do
  log "mpirun -np $np: device two-shot (MPI staged) vs host"
  budget 150 "mpirun -np $np test_cuda_two_shot" || continue
  timeout "$T" "${MPIRUN[@]}" -np "$np" "$BUILD/tests/test_cuda_two_shot" \
    --gtest_filter='CudaTwoShot.StagedMpiMatchesHost' --gtest_color=no > "$OUT/mpi_test_np$np.log" 2>&1 \
    || { tail -30 "$OUT/mpi_test_np$np.log"; fail "mpirun -np $np test"; }
  gtest_ok "$OUT/mpi_test_np$np.log" "mpirun -np $np test_cuda_two_shot" "$np"
done
log "all-reduce: NCCL, 1 rank"
if budget 120 "bench_gpu allreduce nccl"; then
  timeout "$T" "$BUILD/experiments/bench_gpu" allreduce --backend nccl --log2n-max 24 \
    > "$OUT/allreduce_nccl_np1.log" 2>&1 || fail "bench_gpu allreduce nccl"
  cat "$OUT/allreduce_nccl_np1.log"
fi
for np in 2 4; do
  log "all-reduce: MPI staged, $np ranks sharing the GPU"
  budget 150 "bench_gpu allreduce mpi np $np" || continue
  timeout "$T" "${MPIRUN[@]}" -np "$np" "$BUILD/experiments/bench_gpu" allreduce --backend mpi \
    --log2n-max 24 > "$OUT/allreduce_mpi_np$np.log" 2>&1 || fail "bench_gpu allreduce mpi np $np"
  cat "$OUT/allreduce_mpi_np$np.log"
done

# ---- 9. PyTorch torch.compile training while the budget allows (optional: not a failure) --------
for spec in "resnet20 128 1x28x28" "resnet18 256 3x32x32"; do
  read -r model batch input <<< "$spec"
  left=$((deadline - $(date +%s) - 15))
  if ((left < 90)); then
    log "torch.compile $model: skipped (time budget: ${left}s left)"
    continue
  fi
  T=$((left < 180 ? left : 180))
  log "PyTorch torch.compile on the GPU: $model (fp32, AMP bf16), at most ${T}s"
  timeout "$T" python3 experiments/bench_train_torch.py --device cuda --compile --model "$model" \
    --batch "$batch" --input "$input" --precision fp32 --precision bf16 --steps 20 --reps 3 \
    > "$OUT/torch_train_compile_${model}_b$batch.log" 2>&1 \
    || echo "torch.compile failed (see torch_train_compile_${model}_b$batch.log)"
  grep -v '^{' "$OUT/torch_train_compile_${model}_b$batch.log" | tail -3
done
bench_train_json > "$OUT/bench_train_gpu.json" || fail "bench_train_gpu.json"

# ---- summary: the JSON results, the kernels' line last -----------------------------------------
log "done in $(($(date +%s) - t_start)) s, status $status"
cat "$OUT/gpu_train.json" "$OUT/bench_train_gpu.json"
cat "$OUT/gpu.json"
exit $status
