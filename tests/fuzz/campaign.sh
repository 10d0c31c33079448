#!/usr/bin/env bash
# A fuzzing campaign: hours, not CI's seconds.
#
#   tests/fuzz/campaign.sh HOURS [TARGETS...]      e.g.  tests/fuzz/campaign.sh 8
#                                                         tests/fuzz/campaign.sh 0.5 h2 http1
#
# Builds the fuzz targets (clang, -DMOAT_FUZZ=ON, -O1, in build-campaign/), then runs every
# target (default: all of tests/fuzz/*_fuzz.c) for HOURS (fractional allowed) with its seeds
# (tests/fuzz/seeds/NAME), its dictionary (tests/fuzz/dict/NAME.dict) and a corpus that persists
# between campaigns outside git ($MOAT_FUZZ_DIR/corpus/NAME). Afterwards each corpus is
# minimised (-merge=1 into a fresh folder that replaces it) and a table is printed: target,
# executions, coverage (cov/ft of the last stats line, and the edges/features the minimised
# corpus covers), corpus size, crashes.
#
# Parallelism: JOBS processes at most (default nproc). With at least as many jobs as targets,
# all targets run at once, each with -fork=JOBS/targets workers; with fewer, JOBS targets run at
# a time and the campaign takes ceil(targets/JOBS) * HOURS. libFuzzer's fork mode keeps going
# after a crash (-ignore_crashes), so one bug does not end a night's run.
#
# Crashes, leaks, timeouts and OOMs go to $MOAT_FUZZ_DIR/campaign-DATE/crashes/NAME/, and the
# table prints the command that reproduces each. Every process has a wall-clock limit.
#
# Environment: MOAT_FUZZ_DIR (default /var/tmp/moat-fuzz), JOBS (default nproc),
# FUZZ_TIMEOUT (seconds one input may take, default 10), FUZZ_RSS_MB (default 2048).
set -uo pipefail

usage() {
    echo "usage: $0 HOURS [TARGETS...]   (HOURS may be fractional, e.g. 0.25)" >&2
    exit 2
}
[[ $# -ge 1 ]] || usage
hours=$1
shift
[[ $hours =~ ^[0-9]*\.?[0-9]+$ ]] || usage
secs=$(awk -v h="$hours" 'BEGIN { s = int(h * 3600 + 0.5); print (s < 1 ? 1 : s) }')

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 1
jobs=${JOBS:-$(nproc)}
[[ $jobs =~ ^[1-9][0-9]*$ ]] || { echo "JOBS must be a positive number" >&2; exit 2; }
fuzz_timeout=${FUZZ_TIMEOUT:-10}
rss_mb=${FUZZ_RSS_MB:-2048}
base=${MOAT_FUZZ_DIR:-/var/tmp/moat-fuzz}
build=$root/build-campaign
run=$base/campaign-$(date -u +%Y%m%d-%H%M%S)

all=$(cd tests/fuzz && ls *_fuzz.c | sed 's/_fuzz\.c$//')
targets=()
if [[ $# -eq 0 ]]; then
    targets=($all)
else
    for t in "$@"; do
        t=${t%_fuzz}
        grep -qx "$t" <<<"$all" || { echo "no fuzz target '$t' (have: $(echo $all))" >&2; exit 2; }
        targets+=("$t")
    done
fi
n=${#targets[@]}

mkdir -p "$run" || exit 1
echo "== build ($build)"
if ! CC=clang cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Debug -DCMAKE_C_FLAGS_DEBUG="-g -O1" \
    -DMOAT_FUZZ=ON >"$run/cmake.log" 2>&1 ||
    ! cmake --build "$build" -j"$jobs" --target "${targets[@]/%/_fuzz}" >"$run/build.log" 2>&1; then
    tail -40 "$run/cmake.log" "$run/build.log" 2>/dev/null
    echo "build failed (logs in $run)"
    exit 1
fi

# Workers per target, and how many targets run at once.
if ((jobs >= n)); then
    fork=$((jobs / n))
    at_once=$n
else
    fork=1
    at_once=$jobs
fi
waves=$(((n + at_once - 1) / at_once))
echo "== fuzzing ${targets[*]}: ${secs}s each, $at_once at a time with $fork worker(s) each" \
    "(about $((waves * secs))s in all); campaign folder $run"

fuzz_one() {
    local t=$1 corpus=$base/corpus/$1 crashes=$run/crashes/$1
    local seeds=() dict=()
    mkdir -p "$corpus" "$crashes"
    [[ -d tests/fuzz/seeds/$t ]] && seeds=("tests/fuzz/seeds/$t")
    [[ -f tests/fuzz/dict/$t.dict ]] && dict=(-dict="tests/fuzz/dict/$t.dict")
    # libFuzzer stops by itself at max_total_time; timeout is the backstop if it does not.
    timeout --kill-after=60 $((secs + 300)) \
        "$build/${t}_fuzz" -fork="$fork" -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        -max_total_time="$secs" -timeout="$fuzz_timeout" -rss_limit_mb="$rss_mb" \
        -artifact_prefix="$crashes/" -print_final_stats=1 "${dict[@]}" \
        "$corpus" "${seeds[@]}" >"$run/$t.log" 2>&1
    echo "$t: fuzzing ended ($?)"
}

running=0
for t in "${targets[@]}"; do
    if ((running >= at_once)); then
        wait -n
        running=$((running - 1))
    fi
    fuzz_one "$t" &
    running=$((running + 1))
done
wait

echo "== minimising corpora"
merge_one() {
    local t=$1 corpus=$base/corpus/$1
    local fresh=$corpus.merge.$$
    rm -rf "$fresh"
    mkdir -p "$fresh"
    # A merge replays every file once: bounded by the corpus, plus a wall-clock backstop.
    if timeout --kill-after=30 $((secs / 4 + 600)) "$build/${t}_fuzz" -merge=1 \
        -timeout="$fuzz_timeout" -rss_limit_mb="$rss_mb" -artifact_prefix="$run/crashes/$t/" \
        "$fresh" "$corpus" >"$run/$t.merge.log" 2>&1; then
        rm -rf "$corpus.old"
        mv "$corpus" "$corpus.old" && mv "$fresh" "$corpus" && rm -rf "$corpus.old"
    else
        echo "$t: merge failed, corpus kept as it was (log: $run/$t.merge.log)"
        rm -rf "$fresh"
    fi
}
running=0
for t in "${targets[@]}"; do
    if ((running >= jobs)); then
        wait -n
        running=$((running - 1))
    fi
    merge_one "$t" &
    running=$((running + 1))
done
wait

echo
echo "== summary ($run)"
# cov/ft: libFuzzer's fork-mode counters from the last stats line; edges/features: what the
# minimised corpus covers (the merge's count, comparable between campaigns).
printf '%-8s %12s %7s %7s %7s %9s %18s %8s\n' target executions cov ft edges features corpus \
    crashes
total_crashes=0
for t in "${targets[@]}"; do
    log=$run/$t.log
    # Fork mode's stats lines: "#RUNS: cov: N ft: N corp: N exec/s N oom/timeout/crash: ...".
    last=$(grep -E '^#[0-9]+: cov: ' "$log" | tail -1)
    execs=$(sed -E 's/^#([0-9]+):.*/\1/' <<<"$last")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
    merged=$(grep -E '^MERGE-OUTER: [0-9]+ new files' "$run/$t.merge.log" 2>/dev/null | tail -1)
    mft=$(sed -nE 's/.* with ([0-9]+) new features.*/\1/p' <<<"$merged")
    medges=$(sed -nE 's/.* ([0-9]+) new coverage edges.*/\1/p' <<<"$merged")
    files=$(find "$base/corpus/$t" -maxdepth 1 -type f | wc -l)
    kib=$(find "$base/corpus/$t" -maxdepth 1 -type f -printf '%s\n' |
        awk '{ s += $1 } END { printf "%d", (s + 1023) / 1024 }')
    found=$(find "$run/crashes/$t" -maxdepth 1 -type f | wc -l) # crash-, leak-, timeout-, oom-
    total_crashes=$((total_crashes + found))
    printf '%-8s %12s %7s %7s %7s %9s %18s %8s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" \
        "${medges:-?}" "${mft:-?}" "$files files/${kib}KiB" "$found"
done
if ((total_crashes > 0)); then
    echo
    echo "== crashes (reproduce with the command shown; ASAN_OPTIONS=symbolize=1 for names)"
    for t in "${targets[@]}"; do
        find "$run/crashes/$t" -maxdepth 1 -type f | sort | while read -r f; do
            echo "$build/${t}_fuzz $f"
        done
    done
fi
echo
echo "logs: $run/<target>.log; corpora: $base/corpus/<target>"
((total_crashes == 0))
