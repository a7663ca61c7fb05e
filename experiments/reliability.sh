#!/usr/bin/env bash
# fm/cifar below print "--set" arguments that are split on purpose (the temp dir has no spaces).
# shellcheck disable=SC2046
# Reliability matrix: runs bad-input and fault cases against a built int4ddp and prints a markdown
# table (category, case, command, expected, observed exit code, first error line, PASS/FAIL) and a
# last JSON line {"cases":N,"passed":M}.
#
#   experiments/reliability.sh BUILD_DIR        (BUILD_DIR holds the int4ddp executable)
#
# Expected behaviour of bad input: exit 2 with a message naming the key, file or path; never a crash
# signal (exit >= 128, except where a signal is the point of the case), never a hang (every case
# runs under a timeout), never a half-written file (no "*.tmp.*" may be left in a case's directory).
# Self-contained: synthetic data or small IDX/CIFAR files made here, all in one temporary directory
# that is removed at the end. About 2 minutes on 2 cores. Multi-rank cases use mpirun (Open MPI).
set -u

[ $# -eq 1 ] || { echo "usage: $0 BUILD_DIR" >&2; exit 2; }
BIN="$(cd "$1" && pwd)/int4ddp"
[ -x "$BIN" ] || { echo "$0: no int4ddp executable in $1" >&2; exit 2; }
command -v python3 > /dev/null || { echo "$0: python3 is needed" >&2; exit 2; }
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none)
HAVE_MPI=0
command -v mpirun > /dev/null && HAVE_MPI=1
CASE_TIMEOUT=${CASE_TIMEOUT:-60}

T=$(mktemp -d /tmp/int4ddp_reliability.XXXXXX)
BG_PIDS=()
cleanup() {
  for p in "${BG_PIDS[@]}"; do kill -9 "$p" 2> /dev/null; done
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

N=0
PASSED=0
ROWS=()

# ---- helpers -------------------------------------------------------------------------------------

# A short, table-safe version of a command: the build path and the temp dir dropped, pipes escaped.
short() {
  local s="$*"
  s=${s//"$BIN"/int4ddp}
  s=${s//"$T/"/}
  s=${s//"${MPIRUN[*]}"/mpirun}
  s=${s//|/\\|}
  [ ${#s} -gt 110 ] && s="${s:0:107}..."
  printf '%s' "$s"
}

# The first line of a file that says "error" (else its first line), table-safe, at most 140 chars.
first_error() {
  local line
  line=$(grep -a -m1 -i 'error' "$1" 2> /dev/null || head -n1 "$1" 2> /dev/null)
  line=$(printf '%s' "$line" | LC_ALL=C tr -c '[:print:]' '?')
  line=${line//"$T/"/}
  line=${line//|/\\|}
  line=$(printf '%s' "$line" | tr -d '\r`')
  [ ${#line} -gt 140 ] && line="${line:0:137}..."
  printf '%s' "$line"
}

# record CATEGORY CASE COMMAND EXPECTED RC ERRFILE VERDICT [REASON]
record() {
  local verdict=$7 reason=${8:-}
  N=$((N + 1))
  [ "$verdict" = PASS ] && PASSED=$((PASSED + 1))
  [ -n "$reason" ] && verdict="$verdict ($reason)"
  ROWS+=("| $N | $1 | $2 | \`$3\` | $4 | $5 | $(first_error "$6") | $verdict |")
  printf '%-10s %-48s rc=%-4s %s\n' "$1" "$2" "$5" "$verdict" >&2
}

# A fresh directory for one case; cd into it.
newcase() {
  CASE_DIR="$T/case$((N + 1))"
  mkdir -p "$CASE_DIR" && cd "$CASE_DIR" || exit 1
}

# Checks shared by every case: exit code, message, no hang, no crash signal, no temp files left.
# verdict RC EXPECTED PATTERN ERRFILE -> sets VERDICT and REASON
verdict() {
  local rc=$1 exp=$2 pat=$3 err=$4
  VERDICT=PASS
  REASON=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && [ "$exp" != "$rc" ]; then
    VERDICT=FAIL REASON="hang: timed out"
  elif [ "$rc" != "$exp" ]; then
    VERDICT=FAIL REASON="exit $rc, expected $exp"
    [ "$rc" -ge 128 ] && REASON="crash signal $((rc - 128)); $REASON"
  elif [ -n "$pat" ] && ! grep -Eiq -- "$pat" "$err"; then
    VERDICT=FAIL REASON="message lacks /$pat/"
  fi
}
# No half-written file: fails the case if a "*.tmp.*" is left in its directory.
no_temp_left() {
  local left
  left=$(find "$CASE_DIR" -name '*.tmp.*' 2> /dev/null | head -n1)
  if [ -n "$left" ] && [ "$VERDICT" = PASS ]; then
    VERDICT=FAIL REASON="left ${left#"$CASE_DIR"/}"
  fi
}

# tcase CATEGORY CASE EXPECTED_RC PATTERN CMD... : runs CMD in a fresh case dir (prepare it with
# PRE="shell code"), checks it, then runs POST="shell code" (its failure makes the case fail with
# the text it prints). LABEL="text" replaces the command shown in the table.
tcase() {
  local cat=$1 name=$2 exp=$3 pat=$4
  shift 4
  newcase
  [ -n "${PRE:-}" ] && eval "$PRE"
  timeout -k 5 "$CASE_TIMEOUT" "$@" > out.txt 2> err.txt
  local rc=$?
  cat out.txt >> err.txt.all 2> /dev/null
  verdict "$rc" "$exp" "$pat" err.txt
  if [ "$VERDICT" = PASS ] && [ -n "${POST:-}" ]; then
    local why
    if ! why=$(eval "$POST" 2>&1); then VERDICT=FAIL REASON="${why:-post-check failed}"; fi
  fi
  no_temp_left
  record "$cat" "$name" "${LABEL:-$(short "$@")}" "$exp" "$rc" err.txt "$VERDICT" "$REASON"
  PRE="" POST="" LABEL=""
  cd "$T" || exit 1
}

skip_case() {
  N=$((N + 1))
  ROWS+=("| $N | $1 | $2 | - | - | - | $3 | SKIP |")
}

# Descendant processes of a pid (the ranks under timeout -> mpirun).
descendants() {
  local c
  for c in $(ps -o pid= --ppid "$1" 2> /dev/null); do
    echo "$c"
    descendants "$c"
  done
}
# The pid of MPI rank R among the descendants of pid P.
rank_pid() {
  local p
  for p in $(descendants "$1"); do
    if tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
      [ "$(readlink "/proc/$p/exe" 2> /dev/null)" = "$BIN" ] && { echo "$p"; return 0; }
    fi
  done
  return 1
}
# Waits until the metrics file at $1 has a step record with batch >= $2 (at most $3 seconds).
wait_batch() {
  local i
  for ((i = 0; i < $3 * 20; ++i)); do
    [ -f "$1" ] && python3 - "$1" "$2" << 'EOF' && return 0
import json, sys
n = 0
for line in open(sys.argv[1]):
    try: r = json.loads(line)
    except ValueError: continue
    if r.get("type") == "step": n = max(n, r.get("batch", 0))
sys.exit(0 if n >= int(sys.argv[2]) else 1)
EOF
    sleep 0.05
  done
  return 1
}
# Metrics check: step batches strictly increase, a final record exists, every line is JSON.
metrics_one_run() {
  python3 - "$1" << 'EOF'
import json, sys
last, final = 0, False
for i, line in enumerate(open(sys.argv[1]), 1):
    r = json.loads(line)
    if r.get("type") == "step":
        if r["batch"] <= last:
            print(f"metrics line {i}: batch {r['batch']} after {last}"); sys.exit(1)
        last = r["batch"]
    final = final or r.get("type") == "final"
if not final: print("metrics: no final record"); sys.exit(1)
EOF
}
# Every *.ckpt under a directory loads (int4ddp eval); prints the first that does not.
all_ckpts_load() {
  local f
  for f in "$1"/*.ckpt; do
    [ -e "$f" ] || continue
    timeout 60 "$BIN" eval --checkpoint "$f" > /dev/null 2> eval_err.txt ||
      { echo "${f##*/} does not load: $(first_error eval_err.txt)"; return 1; }
  done
}

# ---- inputs --------------------------------------------------------------------------------------

# Base config: a small quantized mlp on synthetic data, a few hundred milliseconds per run.
cat > "$T/base.yaml" << 'EOF'
model:
  name: mlp
  mlp_hidden: [64, 64]
data:
  dataset: synthetic
  synthetic_train_size: 512
  synthetic_test_size: 128
train:
  epochs: 2
  batch_size: 32
  threads: 1
  checkpoint_dir: ck
log:
  metrics_path: m/metrics.jsonl
  progress: "off"
  print_every: 1
EOF
B="$T/base.yaml"
# A long run for kills and signals: thousands of steps, a step checkpoint every 20.
LONG=(--set data.synthetic_train_size=4096 --set train.epochs=200 --set train.checkpoint_every_steps=20
  --set 'model.mlp_hidden=[256,256]')
# A slow step (cnn, batch 128) so that two signals land within one step.
SLOW=(--set model.name=cnn --set train.batch_size=512 --set data.synthetic_train_size=4096
  --set train.epochs=50)

# Small IDX datasets (Fashion-MNIST layout) and CIFAR-10 batches, written by python.
python3 - "$T" << 'EOF'
import gzip, os, random, struct, sys
t = sys.argv[1]
random.seed(0)
def idx(path, magic, dims, body, gz=False):
    data = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + body
    if gz:
        with gzip.open(path + ".gz", "wb") as f: f.write(data)
    else:
        with open(path, "wb") as f: f.write(data)
def mnist(d, ntrain=256, ntest=64, gz=False, side=28, label_max=9, nlabels=None, magic=0x803):
    os.makedirs(d, exist_ok=True)
    for prefix, n in (("train", ntrain), ("t10k", ntest)):
        idx(f"{d}/{prefix}-images-idx3-ubyte", magic, [n, side, side],
            bytes(random.randrange(256) for _ in range(n * side * side)), gz)
        nl = n if nlabels is None else nlabels
        idx(f"{d}/{prefix}-labels-idx1-ubyte", 0x801, [nl],
            bytes(random.randrange(label_max + 1) for _ in range(nl)), gz)
mnist(f"{t}/idx_good")
mnist(f"{t}/idx_gz", gz=True)
mnist(f"{t}/idx_magic", magic=0x804)
mnist(f"{t}/idx_count", nlabels=200)
mnist(f"{t}/idx_side", side=27)
mnist(f"{t}/idx_label", label_max=12)
def cifar(d, n=64, extra=0, label_max=9):
    os.makedirs(d, exist_ok=True)
    for name in [f"data_batch_{b}.bin" for b in range(1, 6)] + ["test_batch.bin"]:
        with open(f"{d}/{name}", "wb") as f:
            for _ in range(n):
                f.write(bytes([random.randrange(label_max + 1)]) + os.urandom(3072))
            f.write(os.urandom(extra))
cifar(f"{t}/cifar_good")
cifar(f"{t}/cifar_size", extra=5)
cifar(f"{t}/cifar_label", label_max=12)
# quantize inputs
import array
a = array.array("f", [random.gauss(0, 1) for _ in range(4096)])
a.tofile(open(f"{t}/grads.f32", "wb"))
open(f"{t}/grads_odd.f32", "wb").write(a.tobytes()[:4095 * 4 + 3])
b = array.array("f", a); b[7] = float("nan")
b.tofile(open(f"{t}/grads_nan.f32", "wb"))
EOF
# Variants made from the good files.
cp -r "$T/idx_gz" "$T/idx_trunc_gz"
head -c 20000 "$T/idx_gz/train-images-idx3-ubyte.gz" > "$T/idx_trunc_gz/train-images-idx3-ubyte.gz"
cp -r "$T/idx_good" "$T/idx_empty" && : > "$T/idx_empty/train-labels-idx1-ubyte"
cp -r "$T/idx_good" "$T/idx_short" && truncate -s 100000 "$T/idx_short/train-images-idx3-ubyte"
cp -r "$T/idx_good" "$T/idx_trail" && printf 'xx' >> "$T/idx_trail/t10k-labels-idx1-ubyte"
cp -r "$T/idx_good" "$T/idx_missing" && rm "$T/idx_missing/t10k-images-idx3-ubyte"
mkdir -p "$T/idx_garbage_gz" && cp "$T/idx_gz/"* "$T/idx_garbage_gz/" &&
  printf '\x1f\x8b\x08\x00garbage-not-deflate' > "$T/idx_garbage_gz/train-labels-idx1-ubyte.gz"
mkdir -p "$T/fm_trunc" && cp /usr/share/datasets/fashion-mnist/t10k* "$T/fm_trunc/" 2> /dev/null &&
  cp /usr/share/datasets/fashion-mnist/train-labels* "$T/fm_trunc/" 2> /dev/null &&
  head -c 1000000 /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
    > "$T/fm_trunc/train-images-idx3-ubyte.gz" 2> /dev/null
rm -f "$T/cifar_good/data_batch_5.bin.missing"
cp -r "$T/cifar_good" "$T/cifar_missing" && rm "$T/cifar_missing/data_batch_3.bin"

# A reference run: checkpoints for the checkpoint cases (1 rank; 2 ranks below).
mkdir -p "$T/ref" && (cd "$T/ref" && timeout 60 "$BIN" train -c "$B" --set train.checkpoint_every_steps=5 \
  > out.txt 2> err.txt) || { echo "$0: the reference run failed:" >&2; cat "$T/ref/err.txt" >&2; exit 1; }
REF="$T/ref/ck/last.ckpt"
# The same model, other widths (another model's checkpoint).
mkdir -p "$T/ref_other" && (cd "$T/ref_other" && timeout 60 "$BIN" train -c "$B" \
  --set 'model.mlp_hidden=[32,32]' > out.txt 2> err.txt)
cp "$REF" "$T/trunc.ckpt" && truncate -s 1000 "$T/trunc.ckpt"
cp "$REF" "$T/flip.ckpt" &&
  python3 -c "import sys; f=open(sys.argv[1],'r+b'); f.seek(5000); b=f.read(1); f.seek(5000); f.write(bytes([b[0]^0x40]))" "$T/flip.ckpt"
: > "$T/empty.ckpt"
head -c 4096 /dev/urandom > "$T/garbage.ckpt"
# Resume cases copy the reference run's directory, so the metrics rewind has something to rewind.
PRE_REF='cp -r "$T/ref/ck" "$T/ref/m" .'

# ---- config ----------------------------------------------------------------------------------------

cfg() { # cfg FILE TEXT: a config file of the base plus TEXT appended
  { cat "$B"; printf '%s\n' "$2"; } > "$T/$1"
}
cfg unknown_key.yaml $'quant:\n  wieght_bits: 4'
tcase config "unknown key (quant.wieght_bits)" 2 "quant\.wieght_bits" "$BIN" train -c "$T/unknown_key.yaml"
cfg unknown_section.yaml $'trian:\n  epochs: 1'
tcase config "unknown section (trian)" 2 "trian" "$BIN" train -c "$T/unknown_section.yaml"
cfg wrong_type.yaml $'optim:\n  lr: fast'
tcase config "wrong type (optim.lr: fast)" 2 "optim\.lr" "$BIN" train -c "$T/wrong_type.yaml"
cfg float_int.yaml $'quant:\n  weight_bits: 4.5'
tcase config "float for int (quant.weight_bits: 4.5)" 2 "quant\.weight_bits" "$BIN" train -c "$T/float_int.yaml"
cfg list_scalar.yaml $'optim:\n  lr: [0.1]'
tcase config "sequence for a number (optim.lr)" 2 "optim\.lr" "$BIN" train -c "$T/list_scalar.yaml"
cfg range.yaml $'quant:\n  weight_bits: 9'
tcase config "out of range (quant.weight_bits: 9)" 2 "quant\.weight_bits" "$BIN" train -c "$T/range.yaml"
cfg nan.yaml $'optim:\n  lr: .nan'
tcase config "NaN value (optim.lr: .nan)" 2 "optim\.lr" "$BIN" train -c "$T/nan.yaml"
cfg enum.yaml $'comm:\n  mode: int3'
tcase config "bad enum (comm.mode: int3)" 2 "comm\.mode" "$BIN" train -c "$T/enum.yaml"
{ cat "$B"; printf -- '---\nmodel:\n  name: cnn\n'; } > "$T/two_docs.yaml"
tcase config "two YAML documents in one file" 2 "two_docs\.yaml" "$BIN" train -c "$T/two_docs.yaml"
printf 'train:\n  epochs: 1\n  epochs: 2\n' > "$T/dup_key.yaml"
tcase config "duplicate key (train.epochs twice)" 2 "train\.epochs" "$BIN" train -c "$T/dup_key.yaml"
printf 'model:\n  name: [mlp\n' > "$T/syntax.yaml"
tcase config "YAML syntax error" 2 "syntax\.yaml.*line" "$BIN" train -c "$T/syntax.yaml"
printf -- '- a\n- b\n' > "$T/top_list.yaml"
tcase config "top level is a list" 2 "top_list\.yaml" "$BIN" train -c "$T/top_list.yaml"
head -c 300 /dev/urandom > "$T/binary.yaml"
tcase config "binary garbage as config" 2 "binary\.yaml" "$BIN" train -c "$T/binary.yaml"
: > "$T/empty.yaml"
tcase config "empty file: defaults (+ --set to keep it small)" 0 "" "$BIN" train -c "$T/empty.yaml" \
  --set data.dataset=synthetic --set data.synthetic_train_size=256 --set train.epochs=1 \
  --set train.threads=1 --set train.checkpoint_dir=ck --set log.metrics_path=m.jsonl
tcase config "directory as config" 2 "$T" "$BIN" train -c "$T"
tcase config "missing config file" 2 "no_such\.yaml" "$BIN" train -c "$T/no_such.yaml"
tcase config "no --config" 2 "config" "$BIN" train
tcase config "unknown option (--bogus)" 2 "bogus" "$BIN" train -c "$B" --bogus
tcase config "--set unknown key (train.epochz)" 2 "train\.epochz" "$BIN" train -c "$B" --set train.epochz=3
tcase config "--set bad value (train.epochs=abc)" 2 "train\.epochs" "$BIN" train -c "$B" --set train.epochs=abc
tcase config "--set without '=' (train.epochs)" 2 "train\.epochs" "$BIN" train -c "$B" --set train.epochs
tcase config "--set a section (train=3)" 2 "train" "$BIN" train -c "$B" --set train=3
tcase config "comm.backend=nccl (refused on CPU layers)" 2 "nccl" "$BIN" train -c "$B" --set comm.backend=nccl
tcase config "train.device=cuda (no such key)" 2 "train\.device" "$BIN" train -c "$B" --set train.device=cuda
tcase config "warmup_epochs >= epochs" 2 "warmup_epochs" "$BIN" train -c "$B" --set schedule.warmup_epochs=2
tcase config "milestones not increasing" 2 "schedule\.milestones" "$BIN" train -c "$B" --set 'schedule.milestones=[0.7,0.3]'
tcase config "batch_size above the training set" 2 "train\.batch_size" "$BIN" train -c "$B" --set train.batch_size=1024
tcase config "max_consecutive_skips=0" 2 "train\.max_consecutive_skips" "$BIN" train -c "$B" --set train.max_consecutive_skips=0
tcase config "mlp with no quantizable layer" 2 "model\.mlp_hidden" "$BIN" train -c "$B" --set 'model.mlp_hidden=[16]'

# ---- data ------------------------------------------------------------------------------------------

fm() { echo --set data.dataset=fashion_mnist --set "data.path=$T/$1"; }
tcase data "small plain IDX set (control)" 0 "" "$BIN" train -c "$B" $(fm idx_good)
tcase data "small gzip IDX set (control)" 0 "" "$BIN" train -c "$B" $(fm idx_gz)
tcase data "missing data directory" 2 "no_such_dir" "$BIN" train -c "$B" $(fm no_such_dir)
tcase data "missing test images file" 2 "t10k-images" "$BIN" train -c "$B" $(fm idx_missing)
tcase data "truncated gzip" 2 "train-images-idx3-ubyte\.gz" "$BIN" train -c "$B" $(fm idx_trunc_gz)
tcase data "gzip magic, garbage body" 2 "train-labels-idx1-ubyte\.gz" "$BIN" train -c "$B" $(fm idx_garbage_gz)
tcase data "truncated copy of Fashion-MNIST train images" 2 "train-images-idx3-ubyte\.gz" "$BIN" train -c "$B" $(fm fm_trunc)
tcase data "wrong IDX magic" 2 "train-images-idx3-ubyte" "$BIN" train -c "$B" $(fm idx_magic)
tcase data "label/image count mismatch" 2 "labels-idx1-ubyte.*200 labels" "$BIN" train -c "$B" $(fm idx_count)
tcase data "empty labels file" 2 "train-labels-idx1-ubyte" "$BIN" train -c "$B" $(fm idx_empty)
tcase data "images 27x27" 2 "27x27" "$BIN" train -c "$B" $(fm idx_side)
tcase data "label outside 0..9" 2 "label 1[0-2]" "$BIN" train -c "$B" $(fm idx_label)
tcase data "truncated pixels (plain IDX)" 2 "train-images-idx3-ubyte" "$BIN" train -c "$B" $(fm idx_short)
tcase data "trailing bytes after labels" 2 "t10k-labels-idx1-ubyte" "$BIN" train -c "$B" $(fm idx_trail)
cifar() { echo --set data.dataset=cifar10 --set "data.path=$T/$1" --set model.name=cnn --set train.epochs=1; }
tcase data "small CIFAR-10 set (control)" 0 "" "$BIN" train -c "$B" $(cifar cifar_good)
tcase data "CIFAR-10 file not whole records" 2 "data_batch_1\.bin.*3073" "$BIN" train -c "$B" $(cifar cifar_size)
tcase data "CIFAR-10 batch file missing" 2 "data_batch_3\.bin" "$BIN" train -c "$B" $(cifar cifar_missing)
tcase data "CIFAR-10 label outside 0..9" 2 "data_batch_1\.bin.*label" "$BIN" train -c "$B" $(cifar cifar_label)

# ---- checkpoint ----------------------------------------------------------------------------------

tcase checkpoint "resume: missing file" 2 "no_such\.ckpt" "$BIN" train -c "$B" --resume "$T/no_such.ckpt"
tcase checkpoint "resume: a directory" 2 "$T/ref/ck" "$BIN" train -c "$B" --resume "$T/ref/ck"
tcase checkpoint "resume: truncated" 2 "trunc\.ckpt.*truncated" "$BIN" train -c "$B" --resume "$T/trunc.ckpt"
tcase checkpoint "resume: one byte flipped" 2 "flip\.ckpt.*CRC" "$BIN" train -c "$B" --resume "$T/flip.ckpt"
tcase checkpoint "resume: empty file" 2 "empty\.ckpt" "$BIN" train -c "$B" --resume "$T/empty.ckpt"
tcase checkpoint "resume: random bytes" 2 "garbage\.ckpt" "$BIN" train -c "$B" --resume "$T/garbage.ckpt"
tcase checkpoint "resume: another model's checkpoint" 2 "model\.mlp_hidden" "$BIN" train -c "$B" --resume "$T/ref_other/ck/last.ckpt"
tcase checkpoint "resume: changed model.name" 2 "model\.name" "$BIN" train -c "$B" --set model.name=cnn --resume "$REF"
tcase checkpoint "resume: changed optim.lr refused" 2 "optim\.lr" "$BIN" train -c "$B" --set optim.lr=0.05 --resume "$REF"
PRE=$PRE_REF POST='grep -q "train.epochs" out.txt || { echo "change not listed"; exit 1; }; metrics_one_run m/metrics.jsonl'
tcase checkpoint "resume: train.epochs 2->3 allowed, listed" 0 "" "$BIN" train -c "$B" --set train.epochs=3 --resume "$REF"
PRE=$PRE_REF POST='metrics_one_run m/metrics.jsonl'
tcase checkpoint "resume from a mid-epoch step checkpoint" 0 "" "$BIN" train -c "$B" --resume "$T/ref/ck/step_25.ckpt"
tcase checkpoint "eval: good checkpoint" 0 "" "$BIN" eval --checkpoint "$REF"
tcase checkpoint "eval: truncated checkpoint" 2 "trunc\.ckpt" "$BIN" eval --checkpoint "$T/trunc.ckpt"
tcase checkpoint "eval: --set unknown key" 2 "data\.pth" "$BIN" eval --checkpoint "$REF" --set data.pth=x
DEAD=999999
while kill -0 "$DEAD" 2> /dev/null; do DEAD=$((DEAD - 1)); done
STALE="last.ckpt.tmp.$(hostname).$DEAD"
PRE='mkdir ck && head -c 100000 /dev/zero > "ck/'$STALE'"'
POST='[ ! -e "ck/'$STALE'" ] || { echo "stale temp file kept"; exit 1; }'
tcase checkpoint "stale *.ckpt.tmp.<host>.<deadpid> removed" 0 "removed" "$BIN" train -c "$B" --set train.overwrite=true
LIVE="last.ckpt.tmp.$(hostname).$$"
PRE='mkdir ck && : > "ck/'$LIVE'"'
POST='[ -e "ck/'$LIVE'" ] && rm "ck/'$LIVE'" || { echo "live writer temp file removed"; exit 1; }'
tcase checkpoint "temp file of a live pid kept" 0 "" "$BIN" train -c "$B" --set train.overwrite=true
POST='s=$(ls ck | grep -c "^step_"); e=$(ls ck | grep -c "^epoch_"); [ "$s" = 2 ] && [ "$e" = 1 ] && [ -e ck/last.ckpt ] || { echo "kept $s step, $e epoch files"; exit 1; }'
tcase checkpoint "keep_checkpoints=2: newest 2 step_, 1 epoch_" 0 "" "$BIN" train -c "$B" --set train.keep_checkpoints=2 \
  --set train.checkpoint_every_steps=4 --set train.checkpoint_every_epochs=2
POST='s=$(ls ck | grep -c "^step_"); [ "$s" = 7 ] || { echo "kept $s step files, expected 7"; exit 1; }'
tcase checkpoint "keep_checkpoints=0 keeps all" 0 "" "$BIN" train -c "$B" --set train.keep_checkpoints=0 --set train.checkpoint_every_steps=4

# ---- outputs ---------------------------------------------------------------------------------------

touch "$T/afile"
tcase outputs "checkpoint_dir under a regular file" 2 "train\.checkpoint_dir" "$BIN" train -c "$B" --set "train.checkpoint_dir=$T/afile/ck"
tcase outputs "checkpoint_dir under /proc" 2 "train\.checkpoint_dir.*/proc" "$BIN" train -c "$B" --set train.checkpoint_dir=/proc/int4ddp_ck
tcase outputs "checkpoint_dir empty" 2 "train\.checkpoint_dir" "$BIN" train -c "$B" --set train.checkpoint_dir=
tcase outputs "metrics path under a regular file" 2 "log\.metrics_path" "$BIN" train -c "$B" --set "log.metrics_path=$T/afile/m.jsonl"
tcase outputs "metrics path is a directory" 2 "log\.metrics_path" "$BIN" train -c "$B" --set "log.metrics_path=$T"
tcase outputs "metrics on /dev/full" 2 "/dev/full" "$BIN" train -c "$B" --set log.metrics_path=/dev/full
POST='[ ! -e m ] || { echo "metrics written"; exit 1; }'
tcase outputs "metrics_path empty: no metrics" 0 "" "$BIN" train -c "$B" --set log.metrics_path=
PRE=$PRE_REF POST='cmp -s m/metrics.jsonl "$T/ref/m/metrics.jsonl" || { echo "earlier metrics changed"; exit 1; }'
tcase outputs "fresh run over an existing run refused" 2 "--resume.*train\.overwrite|train\.overwrite.*--resume" "$BIN" train -c "$B"
PRE=$PRE_REF
tcase outputs "train.overwrite=true over an existing run" 0 "" "$BIN" train -c "$B" --set train.overwrite=true

# ---- disk (file-size limit: writes fail with EFBIG, as on a full disk; SIGXFSZ ignored) ------------

POST='[ -z "$(ls ck 2> /dev/null | grep "\.ckpt$")" ] || { echo "a checkpoint was written: $(ls ck)"; exit 1; }'
LABEL="ulimit -f 200 (SIGXFSZ ignored); int4ddp train -c base.yaml --set comm.backend=none --set model.mlp_hidden=[512,512]"
tcase disk "checkpoint write fails (ulimit -f 200)" 2 "epoch_1\.ckpt.*File too large" bash -c "trap '' XFSZ; ulimit -f 200; exec \"\$@\"" _ \
  "$BIN" train -c "$B" --set comm.backend=none --set 'model.mlp_hidden=[512,512]'
POST='python3 -c "import json,sys; [json.loads(l) for l in open(\"m/metrics.jsonl\")]" || { echo "metrics not valid JSON lines"; exit 1; }'
LABEL="ulimit -f 8 (SIGXFSZ ignored); int4ddp train -c base.yaml --set comm.backend=none --set train.epochs=20"
tcase disk "metrics write fails (ulimit -f 8)" 2 "log\.metrics_path.*metrics\.jsonl" bash -c "trap '' XFSZ; ulimit -f 8; exec \"\$@\"" _ \
  "$BIN" train -c "$B" --set comm.backend=none --set train.checkpoint_every_epochs=0 --set train.epochs=20

# ---- disk (a private tmpfs mounted with unshare -m: read-only, or a few KB: ENOSPC) ----------------

# in_tmpfs OPTIONS CMD...: runs CMD with a tmpfs mounted at ./mnt in a private mount namespace, then
# saves a listing of mnt/ck and a copy of mnt/m.jsonl in the case directory (the tmpfs goes away).
IN_TMPFS='mount -t tmpfs -o "$0" tmpfs mnt || exit 99; "$@"; rc=$?; ls mnt/ck > listing.txt 2>&1;
  cp mnt/m.jsonl . 2> /dev/null; exit $rc'
if unshare -m true 2> /dev/null; then
  PRE='mkdir mnt'
  LABEL="tmpfs ro at mnt; int4ddp train -c base.yaml --set train.checkpoint_dir=mnt/ck"
  tcase disk "read-only checkpoint_dir" 2 "train\.checkpoint_dir.*Read-only" unshare -m sh -c "$IN_TMPFS" ro \
    "$BIN" train -c "$B" --set train.checkpoint_dir=mnt/ck
  PRE='mkdir mnt'
  LABEL="tmpfs ro at mnt; int4ddp train -c base.yaml --set log.metrics_path=mnt/m.jsonl"
  tcase disk "read-only metrics directory" 2 "log\.metrics_path.*Read-only" unshare -m sh -c "$IN_TMPFS" ro \
    "$BIN" train -c "$B" --set log.metrics_path=mnt/m.jsonl
  PRE='mkdir mnt'
  POST='! grep -q "tmp\|ckpt" listing.txt || { echo "left in the full disk: $(tr "\n" " " < listing.txt)"; exit 1; }'
  LABEL="tmpfs 256k at mnt; int4ddp train -c base.yaml --set train.checkpoint_dir=mnt/ck"
  tcase disk "checkpoint on a full disk (tmpfs 256k)" 2 "epoch_1\.ckpt.*No space" unshare -m sh -c "$IN_TMPFS" size=256k \
    "$BIN" train -c "$B" --set train.checkpoint_dir=mnt/ck
  PRE='mkdir mnt'
  POST='python3 -c "import json,sys; [json.loads(l) for l in open(\"m.jsonl\")]" || { echo "metrics not valid JSON lines"; exit 1; }'
  LABEL="tmpfs 8k at mnt; int4ddp train -c base.yaml --set log.metrics_path=mnt/m.jsonl --set train.epochs=20"
  tcase disk "metrics on a full disk (tmpfs 8k)" 2 "log\.metrics_path.*No space" unshare -m sh -c "$IN_TMPFS" size=8k \
    "$BIN" train -c "$B" --set log.metrics_path=mnt/m.jsonl --set train.epochs=20 --set train.checkpoint_every_epochs=0
else
  skip_case disk "read-only / full tmpfs cases" "unshare -m not permitted"
fi

# ---- numerics --------------------------------------------------------------------------------------

NAN=(--set optim.lr=100 --set optim.momentum=0.99 --set quant.weight_bits=32 --set quant.activation_bits=32
  --set quant.grad_bits=32 --set 'model.mlp_hidden=[512,512,512]' --set train.epochs=5)
POST='python3 - m/metrics.jsonl << "EOF"
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
sk = [r for r in rs if r.get("type") == "skip"]
st = [r for r in rs if r.get("type") == "step" and r.get("skipped")]
if len(sk) < 3: print(f"{len(sk)} skip records"); sys.exit(1)
bad = [r for r in sk + st if "loss" in r and r["loss"] is not None and r["loss"] == r["loss"] and abs(r["loss"]) < 1e38]
if bad: print(f"skipped step with a finite loss logged: {bad[0]}"); sys.exit(1)
EOF'
tcase numerics "huge lr -> NaN: 3 skips then stop" 2 "max_consecutive_skips" "$BIN" train -c "$B" "${NAN[@]}" --set train.max_consecutive_skips=3
tcase numerics "huge lr -> NaN, max_consecutive_skips=1" 2 "max_consecutive_skips" "$BIN" train -c "$B" "${NAN[@]}" --set train.max_consecutive_skips=1

# ---- quantize tool -------------------------------------------------------------------------------

G="$T/grads.f32"
tcase quantize "good input (control)" 0 "" "$BIN" quantize -i "$G" --count 1024 -o out.f32 --codes out.codes
tcase quantize "missing input" 2 "no_such\.f32" "$BIN" quantize -i "$T/no_such.f32"
tcase quantize "empty input" 2 "empty" "$BIN" quantize -i "$T/empty.ckpt"
tcase quantize "input not a multiple of 4 bytes" 2 "grads_odd\.f32" "$BIN" quantize -i "$T/grads_odd.f32"
tcase quantize "input a directory" 2 "$T" "$BIN" quantize -i "$T"
tcase quantize "count does not divide the file" 2 "count" "$BIN" quantize -i "$G" --count 1000
tcase quantize "count 0" 2 "count" "$BIN" quantize -i "$G" --count 0
tcase quantize "bits 1" 2 "bits" "$BIN" quantize -i "$G" --bits 1
tcase quantize "bits 9" 2 "bits" "$BIN" quantize -i "$G" --bits 9
tcase quantize "bits abc" 2 "bits" "$BIN" quantize -i "$G" --bits abc
tcase quantize "unknown policy" 2 "policy" "$BIN" quantize -i "$G" --policy best
tcase quantize "fixed gamma 0" 2 "gamma" "$BIN" quantize -i "$G" --policy fixed --gamma 0
tcase quantize "block size abc" 2 "block" "$BIN" quantize -i "$G" --block-size abc
tcase quantize "block size negative" 2 "block" "$BIN" quantize -i "$G" --block-size -2
POST='[ ! -e out.f32 ] || { echo "output written"; exit 1; }'
tcase quantize "NaN input with --fail-on-nonfinite" 2 "grads_nan\.f32|non-?finite|NaN" "$BIN" quantize -i "$T/grads_nan.f32" \
  --fail-on-nonfinite -o out.f32
tcase quantize "output under a regular file" 2 "afile" "$BIN" quantize -i "$G" -o "$T/afile/out.f32"

# ---- kill (SIGKILL) --------------------------------------------------------------------------------

# kill_resume CASE RANKS: start a long run, SIGKILL (rank 1 if RANKS > 1) after batch 130, check the
# job ends without a hang and every checkpoint left loads, resume from last.ckpt with max_steps.
kill_resume() {
  local name=$1 ranks=$2 launch=() rc verdict=PASS reason="" root
  newcase
  [ "$ranks" -gt 1 ] && launch=("${MPIRUN[@]}" -np "$ranks")
  timeout -k 5 "$CASE_TIMEOUT" "${launch[@]}" "$BIN" train -c "$B" "${LONG[@]}" > out.txt 2> err.txt &
  root=$!
  BG_PIDS+=("$root")
  if wait_batch m/metrics.jsonl 130 30; then
    if [ "$ranks" -gt 1 ]; then
      kill -9 "$(rank_pid "$root" 1)" 2> /dev/null
    else
      kill -9 "$(descendants "$root" | head -n1)" 2> /dev/null
    fi
  else
    verdict=FAIL reason="run did not reach batch 130"
  fi
  wait "$root"
  rc=$?
  [ "$rc" -eq 124 ] && verdict=FAIL reason="hang after the kill"
  [ "$rc" -eq 0 ] && verdict=FAIL reason="exit 0 after a kill"
  if [ "$verdict" = PASS ]; then
    reason=$(all_ckpts_load ck) || verdict=FAIL
  fi
  if [ "$verdict" = PASS ]; then
    timeout -k 5 "$CASE_TIMEOUT" "${launch[@]}" "$BIN" train -c "$B" "${LONG[@]}" --set train.max_steps=300 \
      --resume ck/last.ckpt > out2.txt 2> err2.txt
    local rc2=$?
    if [ "$rc2" -ne 0 ]; then
      verdict=FAIL reason="resume exit $rc2: $(first_error err2.txt)"
    elif ! reason=$(metrics_one_run m/metrics.jsonl); then
      verdict=FAIL
    elif ! grep -q "resumed from" out2.txt; then
      verdict=FAIL reason="no 'resumed from' line"
    fi
    [ -n "$(find . -name '*.tmp.*')" ] && verdict=FAIL reason="temp file left"
  fi
  record kill "$name" "$(short "${launch[@]}" "int4ddp train ...; kill -9 rank; --resume last.ckpt")" \
    "non-zero, then 0" "$rc" err.txt "$verdict" "$reason"
  cd "$T" || exit 1
}
kill_resume "SIGKILL mid-run (1 process), every ckpt loads, --resume continues" 1
# Many kills at random moments: no checkpoint left behind fails to load.
newcase
verdict_k=PASS reason_k=""
for delay in 0.3 0.55 0.8 1.1 1.4; do
  timeout -k 5 "$CASE_TIMEOUT" "$BIN" train -c "$B" "${LONG[@]}" --set train.checkpoint_every_steps=3 \
    --set train.overwrite=true > out.txt 2> err.txt &
  r=$!
  BG_PIDS+=("$r")
  sleep "$delay"
  kill -9 "$(descendants "$r" | head -n1)" 2> /dev/null
  wait "$r"
  if ! reason_k=$(all_ckpts_load ck); then verdict_k=FAIL; break; fi
done
record kill "5 SIGKILLs at 0.3..1.4 s: every *.ckpt left loads" \
  "int4ddp train (ckpt every 3 steps); kill -9 at t; eval each *.ckpt" "every ckpt loads" "137" \
  err.txt "$verdict_k" "$reason_k"
cd "$T" || exit 1
if [ "$HAVE_MPI" = 1 ]; then
  kill_resume "SIGKILL of rank 1 of 2, job ends, --resume continues" 2
else
  skip_case kill "SIGKILL of rank 1 of 2" "no mpirun"
fi

# ---- signals ---------------------------------------------------------------------------------------

# sig_case CASE RANKS SIGNAL TARGET EXPECTED_RC: start a long run, send SIGNAL to TARGET (rank0,
# rank1 or mpirun) after batch 60, expect EXPECTED_RC, a checkpoint at the stop step and a resume
# command; resume and check the metrics read as one run.
sig_case() {
  local name=$1 ranks=$2 sig=$3 target=$4 exp=$5 launch=() rc verdict=PASS reason="" root pid
  newcase
  [ "$ranks" -gt 1 ] && launch=("${MPIRUN[@]}" -np "$ranks")
  timeout -k 5 "$CASE_TIMEOUT" "${launch[@]}" "$BIN" train -c "$B" "${LONG[@]}" > out.txt 2> err.txt &
  root=$!
  BG_PIDS+=("$root")
  if wait_batch m/metrics.jsonl 60 30; then
    case $target in
      rank0) pid=$( ([ "$ranks" -gt 1 ] && rank_pid "$root" 0) || descendants "$root" | head -n1) ;;
      rank1) pid=$(rank_pid "$root" 1) ;;
      mpirun) pid=$(descendants "$root" | head -n1) ;;
    esac
    kill -s "$sig" "$pid"
  else
    verdict=FAIL reason="run did not reach batch 60"
  fi
  wait "$root"
  rc=$?
  if [ "$verdict" = PASS ]; then
    if [ "$rc" -eq 124 ]; then verdict=FAIL reason="hang after the signal"
    elif [ "$rc" -ne "$exp" ]; then verdict=FAIL reason="exit $rc, expected $exp"
    elif ! grep -q -- "--resume" err.txt; then verdict=FAIL reason="no resume command printed"
    fi
  fi
  local ck
  ck=$(grep -o -- "--resume [^ ]*" err.txt | tail -n1 | cut -d' ' -f2 | tr -d "'\"")
  if [ "$verdict" = PASS ]; then
    if [ -z "$ck" ] || [ ! -f "$ck" ]; then
      verdict=FAIL reason="checkpoint '$ck' not found"
    else
      timeout -k 5 "$CASE_TIMEOUT" "${launch[@]}" "$BIN" train -c "$B" "${LONG[@]}" --set train.max_steps=200 \
        --resume "$ck" > out2.txt 2> err2.txt
      local rc2=$?
      if [ "$rc2" -ne 0 ]; then verdict=FAIL reason="resume exit $rc2: $(first_error err2.txt)"
      elif ! reason=$(metrics_one_run m/metrics.jsonl); then verdict=FAIL
      fi
    fi
  fi
  [ -n "$(find . -name '*.tmp.*')" ] && verdict=FAIL reason="temp file left"
  record signal "$name" "$(short "${launch[@]}" "int4ddp train ...; kill -$sig $target; --resume")" \
    "$exp, ckpt, resume 0" "$rc" err.txt "$verdict" "$reason"
  cd "$T" || exit 1
}
sig_case "SIGTERM (1 process): ckpt, exit 143, resume" 1 TERM rank0 143
sig_case "SIGINT (1 process): ckpt, exit 130, resume" 1 INT rank0 130
sig_case "SIGUSR1 (1 process): ckpt, exit 138, resume" 1 USR1 rank0 138
if [ "$HAVE_MPI" = 1 ]; then
  sig_case "SIGTERM to rank 1 of 2: both stop, 143, resume" 2 TERM rank1 143
  sig_case "SIGTERM to rank 0 of 2: both stop, 143, resume" 2 TERM rank0 143
  sig_case "SIGUSR1 to mpirun (forwarded), 138, resume" 2 USR1 mpirun 138
fi
# A second signal exits at once: SIGTERM, then SIGINT within the same (slow) step -> dies of SIGINT
# (130), not the graceful 143. (Sent back to back, both are pending together and the kernel delivers
# SIGINT first, so the first one is waited for.)
newcase
timeout -k 5 "$CASE_TIMEOUT" "$BIN" train -c "$B" "${SLOW[@]}" > out.txt 2> err.txt &
r=$!
BG_PIDS+=("$r")
v=PASS why=""
if wait_batch m/metrics.jsonl 3 30; then
  p=$(descendants "$r" | head -n1)
  kill -TERM "$p"
  # Once the first is handled (its line is on stderr), the second, within the same step.
  for ((i = 0; i < 200; ++i)); do grep -q "SIGTERM received" err.txt && break; sleep 0.01; done
  kill -INT "$p"
else
  v=FAIL why="run did not reach batch 3"
fi
wait "$r"
rc=$?
[ "$v" = PASS ] && [ "$rc" -ne 130 ] && v=FAIL why="exit $rc, expected 130 (killed by the second signal)"
[ "$v" = PASS ] && ! grep -q "second signal" err.txt && v=FAIL why="no 'second signal' line"
[ "$v" = PASS ] && [ -n "$(find . -name '*.tmp.*')" ] && v=FAIL why="temp file left"
record signal "second signal (TERM, then INT) exits at once" "int4ddp train (cnn); kill -TERM; kill -INT" \
  130 "$rc" err.txt "$v" "$why"
cd "$T" || exit 1

# ---- ranks -----------------------------------------------------------------------------------------

if [ "$HAVE_MPI" = 1 ]; then
  mkdir -p "$T/ref2" && (cd "$T/ref2" && timeout 60 "${MPIRUN[@]}" -np 2 "$BIN" train -c "$B" > out.txt 2> err.txt)
  REF2="$T/ref2/ck/last.ckpt"
  tcase ranks "2-rank checkpoint resumed by 1 process" 2 "2 ranks" "$BIN" train -c "$B" --set train.epochs=3 --resume "$REF2"
  tcase ranks "2-rank checkpoint resumed by 3 ranks" 2 "2 ranks" "${MPIRUN[@]}" -np 3 "$BIN" train -c "$B" \
    --set train.epochs=3 --resume "$REF2"
  tcase ranks "1-process checkpoint resumed by 2 ranks" 2 "single process" "${MPIRUN[@]}" -np 2 "$BIN" train -c "$B" \
    --set train.epochs=3 --resume "$REF"
  PRE='cp -r "$T/ref2/ck" "$T/ref2/m" .' POST='metrics_one_run m/metrics.jsonl'
  tcase ranks "2-rank checkpoint resumed by 2 ranks (control)" 0 "" "${MPIRUN[@]}" -np 2 "$BIN" train -c "$B" \
    --set train.epochs=3 --resume "$REF2"
  tcase ranks "configs differ between ranks (MPMD seed 1 / 2)" 2 "differ|hash" "${MPIRUN[@]}" -np 1 "$BIN" train -c "$B" \
    --set train.seed=1 : -np 1 "$BIN" train -c "$B" --set train.seed=2
  tcase ranks "one rank has a bad config (MPMD)" 2 "train\.epochz" "${MPIRUN[@]}" -np 1 "$BIN" train -c "$B" \
    : -np 1 "$BIN" train -c "$B" --set train.epochz=2
  tcase ranks "batch_size above each rank's shard (3 ranks)" 2 "train\.batch_size" "${MPIRUN[@]}" -np 3 "$BIN" train -c "$B" \
    --set train.batch_size=200
  tcase ranks "comm.backend=none under mpirun -np 2" 2 "comm\.backend" "${MPIRUN[@]}" -np 2 "$BIN" train -c "$B" \
    --set comm.backend=none
else
  skip_case ranks "multi-rank cases" "no mpirun"
fi

# ---- report ----------------------------------------------------------------------------------------

echo "| # | category | case | command | expected | exit | first error line | result |"
echo "|---|---|---|---|---|---|---|---|"
printf '%s\n' "${ROWS[@]}"
echo
printf '{"cases":%d,"passed":%d}\n' "$N" "$PASSED"
