#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is missing, checks the
# formatting, builds moat twice (release, and ASan+UBSan), runs the unit tests, each fuzz
# target for a short fixed time (with its seeds and dictionary; tests/fuzz/campaign.sh runs them
# for hours), and the integration tests against the sanitized binary.
# Ends with one line "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
jobs=$(nproc)
failed=0
passed=0
step() { printf '\n== %s\n' "$*"; }
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }

step "dependencies"
packaging/deps.sh --test || { echo "cannot install dependencies"; exit 1; }

step "clang-format"
if git ls-files '*.c' '*.h' | xargs clang-format --dry-run --Werror 2>&1 | head -20 | grep .; then
    bad "clang-format (run: git ls-files '*.c' '*.h' | xargs clang-format -i)"
else
    ok "clang-format"
fi

step "build (release, -Werror)"
if cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j"$jobs" >build-release.log 2>&1; then
    ok "release build"
else
    cat build-release.log; bad "release build"; echo "0 passed, 1 failed"; exit 1
fi

step "build (ASan+UBSan)"
if cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=Debug -DMOAT_SANITIZE=ON >/dev/null &&
    cmake --build build-asan -j"$jobs" >build-asan.log 2>&1; then
    ok "sanitized build"
else
    cat build-asan.log; bad "sanitized build"; echo "$passed passed, $failed failed"; exit 1
fi

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

step "unit tests (ctest, sanitized)"
if (cd build-asan && ctest --output-on-failure -j"$jobs"); then ok "unit tests"; else bad "unit tests"; fi
# A case that cannot run here is reported, never counted as a pass (tests/unit/test.h).
grep -h '^SKIP ' build-asan/Testing/Temporary/LastTest.log 2>/dev/null | sed 's/^/skipped: unit /' || true

step "fuzz targets (${FUZZ_SECONDS}s each)"
if CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=Debug -DMOAT_FUZZ=ON >/dev/null &&
    targets=$(cd tests/fuzz && ls *_fuzz.c | sed 's/\.c$//') &&
    cmake --build build-fuzz -j"$jobs" --target $targets >build-fuzz.log 2>&1; then
    for t in $targets; do
        mkdir -p "build-fuzz/corpus-$t"
        seeds="" dict=()
        [[ -d "tests/fuzz/seeds/${t%_fuzz}" ]] && seeds="tests/fuzz/seeds/${t%_fuzz}"
        [[ -f "tests/fuzz/dict/${t%_fuzz}.dict" ]] && dict=(-dict="tests/fuzz/dict/${t%_fuzz}.dict")
        if "build-fuzz/$t" -max_total_time="$FUZZ_SECONDS" -print_final_stats=0 "${dict[@]}" \
            "build-fuzz/corpus-$t" $seeds >"build-fuzz/$t.log" 2>&1; then
            ok "fuzz $t ($(grep -o 'Done [0-9]* runs' "build-fuzz/$t.log" | tail -1))"
        else
            tail -40 "build-fuzz/$t.log"; bad "fuzz $t"
        fi
    done
else
    cat build-fuzz.log; bad "fuzz build"
fi

step "integration tests (real binary, sanitized)"
export MOAT_BIN="$root/build-asan/moat"
# A leak report at exit would turn a clean stop into exit 1 in tests that check the exit
# code; leaks are checked by the unit tests. Keep ASan's quarantine small so RSS figures mean
# something.
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=0:quarantine_size_mb=16:malloc_context_size=5
# Each test has a time limit (pytest.ini); skips are listed with their reasons (-ra) and counted.
if /usr/bin/python3 -m pytest -q -p no:cacheprovider tests/integration | tee build-asan/pytest.log; then
    ok "integration tests ($(tail -1 build-asan/pytest.log | tr -d '=' | sed 's/^ *//'))"
else
    bad "integration tests"
fi

echo
echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
