#!/usr/bin/env bash
# Install what moat needs from Debian 12's packages, and only what is missing.
#   packaging/deps.sh          build dependencies
#   packaging/deps.sh --test   build and test dependencies
set -euo pipefail

build_pkgs=(build-essential cmake pkg-config ca-certificates
    android-libboringssl-dev libuv1-dev libnghttp2-dev libsqlite3-dev libjansson-dev)
# Tests drive the real binary with real clients and peers; see tests/README.md.
test_pkgs=(clang libclang-rt-14-dev clang-format curl openssl procps
    python3 python3-pytest python3-pytest-timeout python3-httpx python3-h2 python3-fastapi python3-uvicorn
    python3-httptools python3-websockets python3-socketio python3-engineio python3-websocket
    python3-multipart nghttp2-client pebble nginx-light
    podman runc netavark aardvark-dns podman-compose mmdebstrap debhelper
    iptables   # netavark sets up container networks with it (test_compose.py)
    python3-requests chromium libnss3-tools
    python3-matplotlib   # tests/soak.sh plots
    postgresql-15 pgbouncer   # the shared store (storage/postgres.c), started by the tests
    bind9 bind9-dnsutils      # DNS-01: an authoritative server for the test zone
    prometheus                # the metrics scrape test (prometheus + promtool)
    # h2spec (tests/integration/test_h2spec.py) is built from source with Debian's Go.
    golang-go golang-golang-x-net-dev golang-golang-x-text-dev golang-golang-x-sys-dev
    golang-github-spf13-cobra-dev golang-github-spf13-pflag-dev golang-github-fatih-color-dev
    golang-github-mattn-go-colorable-dev golang-github-mattn-go-isatty-dev
    golang-github-inconshreveable-mousetrap-dev)

want=("${build_pkgs[@]}")
if [[ "${1:-}" == "--test" ]]; then
    want+=("${test_pkgs[@]}")
fi

missing=()
for p in "${want[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "deps: installing ${missing[*]}"
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get -o DPkg::Lock::Timeout=120 update -q
    $sudo apt-get -o DPkg::Lock::Timeout=120 install -y -q --no-install-recommends "${missing[@]}"
else
    echo "deps: all ${#want[@]} packages present"
fi
