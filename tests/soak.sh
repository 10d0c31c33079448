#!/usr/bin/env bash
# Soak: moat in front of the stand-in Open WebUI for MINUTES under mixed traffic, with a
# reload every 30 s and an app restart every 2 min; a CSV row every 10 s, a plot and a
# summary at the end. The work is in tests/soak.py (its docstring has the details and the
# pass/fail rule).
#   tests/soak.sh MINUTES [OUTDIR]        (OUTDIR default: a new /tmp/moat-soak-*)
# Environment: SOAK_BUILD (build folder, default build-soak); extra soak.py options after
# OUTDIR, e.g. tests/soak.sh 5 /tmp/s --restart-every 60.
# Needs Debian's python3-matplotlib (packaging/deps.sh --test); installed here if missing.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+([.][0-9]+)?$ ]]; then
    echo "usage: tests/soak.sh MINUTES [OUTDIR] [soak.py options]" >&2
    exit 2
fi
minutes=$1
out=${2:-}
shift $(( $# >= 2 ? 2 : 1 ))
[[ -n "$out" ]] || out=$(mktemp -d /tmp/moat-soak-XXXXXX)

cd "$(dirname "$0")/.."
build=${SOAK_BUILD:-build-soak}

if ! /usr/bin/python3 -c 'import matplotlib' 2>/dev/null; then
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    $sudo apt-get -o DPkg::Lock::Timeout=120 install -y -q --no-install-recommends python3-matplotlib
fi

cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j2 --target moat >/dev/null

mkdir -p "$out"
exec /usr/bin/python3 tests/soak.py --moat "$build/moat" --minutes "$minutes" --out "$out" "$@"
