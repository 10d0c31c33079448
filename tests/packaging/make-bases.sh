#!/usr/bin/env bash
# Make the Debian 12 root file systems the packaging tests boot, without any container
# registry: mmdebstrap from the same Debian mirror apt uses. Each tarball is cached under
# $MOAT_TEST_CACHE (default /var/cache/moat-tests) and made again only when missing.
#   slim.tar    minbase bookworm: imported as debian:bookworm-slim for the Dockerfile's FROM
#   system.tar  bookworm with systemd as init plus moat's build and run dependencies, so the
#               booted test system needs no network (apt and install.sh find them present)
set -euo pipefail
cache=${MOAT_TEST_CACHE:-/var/cache/moat-tests}
mkdir -p "$cache"
mirror=$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
    /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -1)
mirror=${mirror:-http://deb.debian.org/debian}

make_tar() { # NAME MMDEBSTRAP-ARGS...
    local name=$1
    shift
    [[ -s "$cache/$name" ]] && return 0
    echo "make-bases: building $cache/$name from $mirror"
    mmdebstrap --quiet --variant=minbase "$@" bookworm "$cache/$name.tmp" "$mirror"
    mv "$cache/$name.tmp" "$cache/$name"
}

make_tar slim.tar --format=tar --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
make_tar system.tar --format=tar \
    --include=systemd,systemd-sysv,dbus,adduser,curl,ca-certificates,procps,build-essential,cmake,pkg-config,android-libboringssl-dev,libuv1-dev,libnghttp2-dev,libsqlite3-dev,libjansson-dev
