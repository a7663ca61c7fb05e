#!/usr/bin/env bash
# Runs the libFuzzer harnesses one after another, each on one core on a copy of its seed corpus.
#
#   tests/fuzz/run_fuzzers.sh BUILD_DIR OUT_DIR [SECONDS] [HARNESS...]
#
# BUILD_DIR: a build configured with clang and -DINT4DDP_FUZZ=ON (see README.md here). SECONDS
# (default 600) per harness; HARNESS: idx cifar10 config checkpoint quantize (default: all).
# OUT_DIR/<harness>/ gets the grown corpus, the log and any crash-/leak-/timeout- reproducer;
# the last lines of each log (libFuzzer's final stats) are printed.
set -euo pipefail
[ $# -ge 2 ] || { sed -n 2,10p "$0"; exit 2; }
build="$1" out="$2" secs="${3:-600}"
shift $(( $# >= 3 ? 3 : 2 ))
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(idx cifar10 config checkpoint quantize)
status=0
for h in "${harnesses[@]}"; do
    bin="$build/tests/fuzz/fuzz_$h"
    [ -x "$bin" ] || { echo "run_fuzzers: $bin not built" >&2; exit 1; }
    mkdir -p "$out/$h/corpus"
    cp -n "$here/corpus/$h/"* "$out/$h/corpus/"
    echo "== $h: $secs s"
    ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=0 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        "$bin" -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 -detect_leaks=1 \
        -print_final_stats=1 -artifact_prefix="$out/$h/" "$out/$h/corpus" \
        >"$out/$h/log" 2>&1 || { status=1; echo "   FINDING (see $out/$h/log)"; }
    grep -E '^#[0-9]+.*(DONE|cov:)' "$out/$h/log" | tail -n 1
    grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$out/$h/log" || true
    echo "   corpus: $(find "$out/$h/corpus" -type f | wc -l) files"
done
exit $status
