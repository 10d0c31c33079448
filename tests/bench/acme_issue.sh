#!/bin/sh
# Time from `moat run` to a served, valid ACME certificate for one name, against Debian's
# Pebble with PEBBLE_VA_NOSLEEP=1 (real HTTP-01 validation against moat's own port).
#
#   tests/bench/acme_issue.sh [MOAT_BIN] [RUNS]
#
# Prints one line per run and the median. Build moat without sanitizers for a fair figure
# (cmake -DCMAKE_BUILD_TYPE=Release). Loopback only; needs pebble, openssl, /usr/bin/python3.
set -eu
MOAT_BIN=${1:-${MOAT_BIN:-build/moat}}
RUNS=${2:-5}
command -v pebble >/dev/null || { echo "pebble is not installed (apt-get install pebble)"; exit 2; }
exec /usr/bin/python3 - "$MOAT_BIN" "$RUNS" <<'EOF'
import json, os, socket, ssl, statistics, subprocess, sys, tempfile, time, urllib.request

moat, runs = os.path.abspath(sys.argv[1]), int(sys.argv[2])
work = tempfile.mkdtemp(prefix="moat-acme-bench-")

def port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def sh(*a):
    subprocess.run(a, cwd=work, check=True, capture_output=True)

def wait(p, t=15):
    end = time.monotonic() + t
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", p), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise SystemExit(f"port {p} never opened")

sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key")
sh("openssl", "req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=bench ca", "-days", "2",
   "-out", "ca.pem")
sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "srv.key")
open(f"{work}/ext.cnf", "w").write("subjectAltName=IP:127.0.0.1\n")
sh("openssl", "req", "-new", "-key", "srv.key", "-subj", "/CN=localhost", "-out", "srv.csr")
sh("openssl", "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
   "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "srv.pem")

http_port, https_port, pb, mgmt, dns, dnsm = (port() for _ in range(6))
json.dump({"pebble": {"listenAddress": f"127.0.0.1:{pb}",
                      "managementListenAddress": f"127.0.0.1:{mgmt}",
                      "certificate": f"{work}/srv.pem", "privateKey": f"{work}/srv.key",
                      "httpPort": http_port, "tlsPort": https_port, "ocspResponderURL": "",
                      "externalAccountBindingRequired": False}},
          open(f"{work}/pebble.json", "w"))
log = open(f"{work}/peers.log", "ab")
procs = [subprocess.Popen(["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns}", "-management",
                           f"127.0.0.1:{dnsm}", "-http01", "", "-https01", "", "-tlsalpn01", "",
                           "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
                          stdout=log, stderr=log)]
procs.append(subprocess.Popen(["pebble", "-config", f"{work}/pebble.json", "-dnsserver",
                               f"127.0.0.1:{dns}"], stdout=log, stderr=log,
                              env=dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                                       PEBBLE_WFE_NONCEREJECT="0")))
wait(pb)
wait(mgmt)
ctx0 = ssl.create_default_context(cafile=f"{work}/ca.pem")
roots = "".join(urllib.request.urlopen(f"https://127.0.0.1:{mgmt}{p}", context=ctx0).read().decode()
                for p in ("/roots/0", "/intermediates/0"))
open(f"{work}/roots.pem", "w").write(roots)
ctx = ssl.create_default_context(cafile=f"{work}/roots.pem")

times = []
try:
    for i in range(runs):
        name = f"bench{i}.example.test"
        d = f"{work}/run{i}"
        os.makedirs(d)
        open(f"{d}/Moatfile", "w").write(f"{name} 127.0.0.1:9\n")
        t0 = time.monotonic()
        m = subprocess.Popen([moat, "run", "--config", f"{d}/Moatfile", "--data", f"{d}/data",
                              "--http-port", str(http_port), "--https-port", str(https_port),
                              "--listen", "127.0.0.1", "--workers", "1", "--grace", "0",
                              "--acme-ca", f"https://127.0.0.1:{pb}/dir", "--acme-ca-root",
                              f"{work}/ca.pem", "--email", "bench@example.test"],
                             stdout=subprocess.DEVNULL, stderr=open(f"{d}/moat.log", "wb"))
        elapsed = None
        while time.monotonic() - t0 < 30:
            try:
                with socket.create_connection(("127.0.0.1", https_port), 1) as s:
                    with ctx.wrap_socket(s, server_hostname=name):
                        elapsed = time.monotonic() - t0
                        break
            except (OSError, ssl.SSLError):
                time.sleep(0.002)
        m.terminate()
        m.wait(10)
        if elapsed is None:
            raise SystemExit(f"run {i}: no certificate within 30 s; see {d}/moat.log")
        times.append(elapsed)
        print(f"run {i}: {elapsed:.3f} s from moat run to a served, valid certificate")
finally:
    for p in procs:
        p.terminate()
        p.wait(10)
print(f"median {statistics.median(times):.3f} s over {runs} run(s) (Pebble, PEBBLE_VA_NOSLEEP=1)")
EOF
