#!/usr/bin/env bash
# Builds every fuzz target and runs each one for a short fixed time; fails if any target
# crashes (a panic, a hang past the per-input timeout, or running out of memory).
#
# Needs only the Rust toolchain, a C++ compiler (libfuzzer-sys builds libFuzzer) and
# crates.io: cargo-fuzz is installed from crates.io when missing. A nightly toolchain is used
# when rustup has one; otherwise the stable one with RUSTC_BOOTSTRAP=1.
#
# Environment: FUZZ_TIME (seconds per target, default 20), FUZZ_TARGETS (space-separated
# names, default all), FUZZ_TIMEOUT (seconds one input may take, default 10).
#
# For each target it prints
#   fuzz TARGET: N execs in S s (R execs/s), C crashes
# and, for a crash, the end of libFuzzer's log (the panic, its backtrace and the input).
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TERM_COLOR=never

TIME=${FUZZ_TIME:-20}
TIMEOUT=${FUZZ_TIMEOUT:-10}

if rustup run nightly rustc --version >/dev/null 2>&1; then
    CARGO=(cargo +nightly)
else
    echo "fuzz: no nightly toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    CARGO=(cargo)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz from crates.io"
    cargo install cargo-fuzz --locked
fi
cargo fuzz --version

# Sanitizer none: the code under test is safe Rust, so AddressSanitizer finds nothing more
# and halves the speed. Debug assertions (and overflow checks) on.
BUILD=(fuzz build --sanitizer none --debug-assertions)
# Comparison tracing behind a run-time gate (cargo fuzz appends its own flags to these): the
# fuzz library turns it off around the per-input device open, whose 4 KiB config copy is
# the same work every input (see cmp_trace in src/lib.rs).
export RUSTFLAGS="${RUSTFLAGS:-} --cfg fuzz_cmp_gate -Cllvm-args=-sanitizer-coverage-gated-trace-callbacks"
"${CARGO[@]}" fetch --locked --manifest-path Cargo.toml
"${CARGO[@]}" "${BUILD[@]}"

TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
BIN=target/$TRIPLE/release
list=${FUZZ_TARGETS:-$("${CARGO[@]}" fuzz list)}
# shellcheck disable=SC2206 # target names are single words
TARGETS=($list)

failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    rm -f "artifacts/$t"/crash-* "artifacts/$t"/timeout-* "artifacts/$t"/oom-* "artifacts/$t"/leak-*
    seeds=()
    if [ -d "seeds/$t" ]; then seeds=("seeds/$t"); fi
    log="artifacts/$t/log.txt"
    start=$(date +%s.%N)
    set +e
    "$BIN/$t" -max_total_time="$TIME" -timeout="$TIMEOUT" -rss_limit_mb=4096 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        "corpus/$t" "${seeds[@]}" >"$log" 2>&1
    rc=$?
    set -e
    end=$(date +%s.%N)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    execs=${execs:-0}
    crashes=$(find "artifacts/$t" -maxdepth 1 \( -name 'crash-*' -o -name 'timeout-*' \
        -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
    if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi
    awk -v t="$t" -v n="$execs" -v a="$start" -v b="$end" -v c="$crashes" 'BEGIN {
        s = b - a; printf "fuzz %s: %d execs in %.1f s (%.0f execs/s), %d crashes\n", t, n, s, n / s, c }'
    if [ "$crashes" -ne 0 ]; then
        failed=1
        echo "---- $t: end of the libFuzzer log ($log)"
        tail -n 60 "$log"
        find "artifacts/$t" -maxdepth 1 -name '*-*' ! -name log.txt -print
        echo "----"
    fi
done

if [ "$failed" -ne 0 ]; then
    echo "fuzz: FAILED (a target crashed)"
    exit 1
fi
echo "fuzz: ${#TARGETS[@]} targets, 0 crashes"
