#!/usr/bin/env bash
# The side-by-side benchmark in one command: installs what is missing (nginx, h2o, Caddy, h2load,
# wrk), builds moat (Release) and runs nginx, h2o, Caddy and moat as TLS reverse proxies to the
# same upstreams on loopback, one worker each, the proxy pinned to CPU 0 and the clients and
# upstreams to CPU 1. Prints one table (medians of 3 runs) with ratios moat/h2o, moat/nginx,
# moat/Caddy. See tests/bench/README.md.
#
#   tests/bench/run.sh [bench.py options: --proxies moat,h2o --metrics h1,sse --out DIR]
#   BENCH_SECONDS=4 BENCH_REPEAT=3 BENCH_IDLE_CONNS=5000 BENCH_BUILD=/tmp/build-bench
#   BENCH_WS_CONNS=10000 BENCH_WS_HOLD=60 BENCH_WS_INFLIGHT=200 (the ws metric)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${BENCH_BUILD:-/tmp/build-bench}

sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
missing=()
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need nginx nginx-light
need h2o h2o
need caddy caddy
need h2load nghttp2-client
need wrk wrk
need curl curl
need openssl openssl
need taskset util-linux
need cmake cmake
[[ -x /usr/bin/python3 ]] || missing+=(python3)
# The ws metric's socket.io upstream (as Open WebUI runs it).
/usr/bin/python3 -c "import socketio, engineio, uvicorn, websockets" 2>/dev/null ||
    missing+=(python3-socketio python3-engineio python3-uvicorn python3-websockets)
if ((${#missing[@]})); then
    echo "bench: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get -o DPkg::Lock::Timeout=120 update -q
    $sudo apt-get -o DPkg::Lock::Timeout=120 install -y -q --no-install-recommends "${missing[@]}"
fi
packaging/deps.sh >/dev/null

if [[ $(nproc) -lt 2 ]]; then
    echo "bench: needs 2 CPUs (proxy on CPU 0, clients on CPU 1)" >&2
    exit 1
fi

echo "bench: building moat (Release) in $build"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j"$(nproc)" --target moat >"$build/bench-build.log" 2>&1 ||
    { tail -30 "$build/bench-build.log"; exit 1; }

# 5,000 idle connections need more descriptors than the usual 1,024 (bench.py raises the soft
# limit to the hard one as well, for when it is run on its own).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
exec /usr/bin/python3 tests/bench/bench.py --moat "$build/moat" "$@"
