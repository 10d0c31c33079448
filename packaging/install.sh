#!/usr/bin/env bash
# Install moat from this checkout as a systemd service, on Debian or Ubuntu.
#
#   sudo ./packaging/install.sh chat.example.com 127.0.0.1:3000 --email me@example.com
#   sudo ./packaging/install.sh                 upgrade in place, keeping the site and data
#   sudo ./packaging/install.sh --uninstall     remove the program, keep config and data
#   sudo ./packaging/install.sh --uninstall --purge   remove config, data and the user too
#
# Installs what the build needs (packaging/deps.sh), builds moat, and installs
# /usr/local/bin/moat, the unit /etc/systemd/system/moat.service (the same hardened unit as
# the Debian package), the `moat` system user, /var/lib/moat (data) and /etc/moat/Moatfile
# (the site file, written from the arguments). Running it again rebuilds and restarts only
# what changed; the site file changes only when a site is given.
set -euo pipefail

prefix=/usr/local
etc=/etc/moat
data=/var/lib/moat
unit=/etc/systemd/system/moat.service
build=/var/cache/moat-install/build
here=$(cd "$(dirname "$0")" && pwd)
src=$(cd "$here/.." && pwd)

say() { printf 'install: %s\n' "$*"; }
die() {
    printf 'install: %s\n' "$*" >&2
    exit 1
}

usage() {
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-0}"
}

uninstall=0
purge=0
email=""
site=()
while (($#)); do
    case "$1" in
    --uninstall) uninstall=1 ;;
    --purge) purge=1 ;;
    --email)
        (($# >= 2)) || die "--email needs an address"
        email=$2
        shift
        ;;
    --email=*) email=${1#--email=} ;;
    -h | --help) usage 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) site+=("$1") ;;
    esac
    shift
done

[[ $(id -u) -eq 0 ]] || die "run me as root (sudo $0 ...)"
if ! command -v systemctl >/dev/null || [[ ! -d /run/systemd/system ]]; then
    die "this machine does not run systemd; run moat directly (moat run) or use the Docker image"
fi

if ((purge && !uninstall)); then
    die "--purge goes with --uninstall"
fi

if ((uninstall)); then
    if systemctl list-unit-files moat.service >/dev/null 2>&1 && [[ -f $unit ]]; then
        systemctl disable --now moat.service >/dev/null 2>&1 || true
    fi
    rm -f "$unit" "$prefix/bin/moat"
    systemctl daemon-reload
    systemctl reset-failed moat.service >/dev/null 2>&1 || true
    rm -rf /var/cache/moat-install
    if ((purge)); then
        rm -rf "$etc" "$data"
        if getent passwd moat >/dev/null; then userdel moat 2>/dev/null || true; fi
        if getent group moat >/dev/null; then groupdel moat 2>/dev/null || true; fi
        say "moat removed, with its site file, data and user"
    else
        say "moat removed; kept $etc (site file) and $data (certificates and keys)"
        say "remove those too with: $0 --uninstall --purge"
    fi
    exit 0
fi

if dpkg-query -W -f='${Status}' moat 2>/dev/null | grep -q "install ok installed"; then
    die "moat is installed as a Debian package; upgrade it with apt, or remove it first"
fi
if ((${#site[@]} == 1)); then
    die "give the site as SITE UPSTREAM, for example: chat.example.com 127.0.0.1:3000"
fi

# 1. Build dependencies, then the binary. The build folder is kept so that a re-run only
#    recompiles what changed.
"$src/packaging/deps.sh"
mkdir -p "$build"
say "building moat (this takes a minute the first time)"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release >"$build/../cmake.log" 2>&1 ||
    { cat "$build/../cmake.log" >&2; die "cmake failed"; }
cmake --build "$build" -j"$(nproc)" --target moat >"$build/../build.log" 2>&1 ||
    { tail -40 "$build/../build.log" >&2; die "the build failed"; }

changed=0 # the binary or the unit changed: restart
reconfigured=0 # only the site file changed: reload

# 2. The program, replaced atomically so a running moat keeps its old inode.
install -d "$prefix/bin"
if ! cmp -s "$build/moat" "$prefix/bin/moat"; then
    install -m 0755 "$build/moat" "$prefix/bin/moat.new"
    mv -f "$prefix/bin/moat.new" "$prefix/bin/moat"
    changed=1
    say "installed $prefix/bin/moat ($("$prefix/bin/moat" version))"
fi

# 3. The user moat runs as, and its data folder (it holds private keys: 0700).
if ! getent passwd moat >/dev/null; then
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    useradd --system --user-group --home-dir "$data" --no-create-home --shell "$nologin" \
        --comment "moat HTTPS reverse proxy" moat
    say "created the system user moat"
fi
install -d -m 0700 -o moat -g moat "$data"

# 4. The site file: written from the arguments (checked first), else kept, else the default.
install -d -m 0755 "$etc"
new=$(mktemp)
trap 'rm -f "$new"' EXIT
if ((${#site[@]})); then
    line="${site[*]}"
    [[ -n $email ]] && line+=" email=$email"
    printf '# Written by packaging/install.sh; edit, then: systemctl reload moat\n%s\n' \
        "$line" >"$new"
elif [[ -n $email ]]; then
    die "--email goes with a site: $0 SITE UPSTREAM --email $email"
elif [[ ! -f $etc/Moatfile ]]; then
    cp "$src/packaging/Moatfile.default" "$new"
else
    cp "$etc/Moatfile" "$new"
fi
"$prefix/bin/moat" validate --config "$new" >/dev/null || die "the site is not valid (above)"
if ! cmp -s "$new" "$etc/Moatfile"; then
    if [[ -f $etc/Moatfile ]]; then
        cp -p "$etc/Moatfile" "$etc/Moatfile.bak"
        say "saved the previous site file as $etc/Moatfile.bak"
    fi
    install -m 0644 "$new" "$etc/Moatfile"
    reconfigured=1
fi

# 5. The unit: the package's hardened unit, pointed at this binary.
sed "s|/usr/bin/moat|$prefix/bin/moat|g" "$here/systemd/moat.service" >"$new"
if ! cmp -s "$new" "$unit"; then
    install -m 0644 "$new" "$unit"
    systemctl daemon-reload
    changed=1
fi
systemctl enable moat.service >/dev/null 2>&1

# 6. Start, restart or reload, as little as what changed needs.
if ! systemctl is-active --quiet moat.service; then
    systemctl reset-failed moat.service >/dev/null 2>&1 || true
    systemctl start moat.service || true
elif ((changed)); then
    systemctl restart moat.service || true
elif ((reconfigured)); then
    systemctl reload moat.service || true
fi
for _ in $(seq 50); do
    "$prefix/bin/moat" health --data "$data" >/dev/null 2>&1 && break
    sleep 0.2
done
if ! "$prefix/bin/moat" health --data "$data"; then
    journalctl -u moat.service -n 20 --no-pager >&2 || true
    die "moat did not come up; the log is above (journalctl -u moat)"
fi

echo
say "moat is running and starts at boot."
"$prefix/bin/moat" validate --config "$etc/Moatfile" | sed 's/^/  /'
echo "  site file: $etc/Moatfile   (edit, then: systemctl reload moat)"
echo "  data:      $data   (certificates, keys, the internal CA)"
echo "  logs:      journalctl -u moat -f"
echo "  status:    systemctl status moat"
