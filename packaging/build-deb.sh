#!/usr/bin/env bash
# Build moat_*.deb from this checkout. The repository layout has no top-level debian/, so
# the sources and packaging/debian/ are staged together in a temporary folder and built
# there with `dpkg-buildpackage -us -uc -b`. Prints the folder holding the .deb.
#   packaging/build-deb.sh [OUTDIR]     (default: a new temporary folder)
set -euo pipefail
# MOAT_SRC: build another checkout with this packaging (default: the one holding this script).
pkg=$(cd "$(dirname "$0")" && pwd)
src=$(cd "${MOAT_SRC:-$pkg/..}" && pwd)
out=${1:-$(mktemp -d /tmp/moat-deb.XXXXXX)}
mkdir -p "$out"
out=$(cd "$out" && pwd)

need=(dpkg-buildpackage dh cmake pkg-config)
for t in "${need[@]}"; do
    if ! command -v "$t" >/dev/null; then
        echo "build-deb: $t is missing; install: apt-get install dpkg-dev debhelper cmake" \
            "pkg-config (and packaging/deps.sh for the libraries)" >&2
        exit 1
    fi
done

stage=$(mktemp -d /tmp/moat-deb-stage.XXXXXX)
trap 'rm -rf "$stage"' EXIT
tree="$stage/moat-0.1.0"
mkdir -p "$tree"
# Only what the build reads: no build folders or logs from the checkout.
for d in CMakeLists.txt include server http2 acme storage; do
    [[ -e "$src/$d" ]] && cp -a "$src/$d" "$tree/"
done
mkdir -p "$tree/packaging"
cp "$pkg/Moatfile.default" "$tree/packaging/"
cp -a "$pkg/debian" "$tree/debian"
cp "$pkg/systemd/moat.service" "$tree/debian/moat.service"

(cd "$tree" && dpkg-buildpackage -us -uc -b -j"$(nproc)") >"$stage/build.log" 2>&1 || {
    tail -40 "$stage/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed" >&2
    exit 1
}
mv "$stage"/moat_*.deb "$out/"
if command -v lintian >/dev/null; then
    lintian --no-tag-display-limit "$out"/moat_*.deb >&2 || true
fi
echo "$out"
