#!/usr/bin/python3
"""Side-by-side benchmark: nginx, h2o, Caddy and moat as TLS reverse proxies (one worker each)
in front of the same upstreams on loopback.  The proxy is pinned to CPU 0, the load generators
and upstreams to CPU 1, so the figures compare per-core efficiency.  Every measurement runs
BENCH_REPEAT times (default 3); the table shows the median.  run.sh installs the tools and
builds moat, then calls this.

    bench.py --moat PATH [--proxies nginx,h2o,caddy,moat] [--metrics h2,h1,...] [--out DIR]
"""
import argparse
import json
import os
import random
import resource
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = "/usr/bin/python3"


def knob(name, default):
    """BENCH_<name> from the environment, of the default's type."""
    return type(default)(os.environ.get("BENCH_" + name, default))


SECONDS = knob("SECONDS", 4.0)
REPEAT = knob("REPEAT", 3)
IDLE_CONNS = knob("IDLE_CONNS", 5000)
IDLE_INFLIGHT = knob("IDLE_INFLIGHT", 200)
# How long idle() waits after the last handshake before it reads RSS.
IDLE_SETTLE_S = knob("IDLE_SETTLE", 10.0)
# How long after a load run its memory must have come back (see mem()).
MEM_SETTLE_S = knob("MEM_SETTLE", 10.0)
BIG = knob("BIG_BYTES", 1 << 30)
# The ws metric: socket.io websockets held through the proxy (see ws()).
WS_CONNS = knob("WS_CONNS", 10000)
WS_HOLD_S = knob("WS_HOLD", 60.0)
WS_INFLIGHT = knob("WS_INFLIGHT", 200)
WS_PING_S = knob("WS_PING", 10.0)
WS_OPEN_DEADLINE_S = knob("WS_OPEN_DEADLINE", 240)
WS_REPEAT = knob("WS_REPEAT", 1)
PROXY_CPU, CLIENT_CPU = "0", "1"
# Raise the soft open-files limit to the hard one; every child inherits it.  The ws metric
# needs two descriptors per websocket in the proxy (client and upstream side): as root, raise
# the hard limit too.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    _want = max(_hard, 2 * WS_CONNS + 4096) if os.geteuid() == 0 else _hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (_want, _want))
    _hard = _want
except (OSError, ValueError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
NOFILE = _hard
# Without CAP_SYS_RESOURCE (a container) the hard limit stays where it is; then a proxy can
# hold only as many websockets as half its descriptors allow, less a few for its listeners,
# logs and pool, and the ws metric opens that many (the table says how many).
if 2 * WS_CONNS + 100 > NOFILE:
    WS_CONNS = (NOFILE - 100) // 2
ALL_PROXIES = ["nginx", "h2o", "caddy", "moat"]
ALL_METRICS = ["h2", "h1", "newconn", "idle", "mem", "p99", "sse", "upload", "download", "ws"]


def log(msg):
    print("[bench %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def free_port():
    while True:
        p = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p))
                return p
            except OSError:
                continue


def on_client_cpu(argv):
    return ["taskset", "-c", CLIENT_CPU] + argv


def run(argv, timeout=None, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# ---- process memory ------------------------------------------------------------------------


def tree(pid):
    """pid and all its descendants (nginx's worker is the master's child)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open("/proc/%s/stat" % d) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/status" % p) as f:
                for ln in f:
                    if ln.startswith("VmRSS:"):
                        total += int(ln.split()[1])
        except OSError:
            pass
    return total


def cpu_seconds(pid):
    """User + system CPU time of pid's process tree, all threads."""
    total = 0
    for p in tree(pid):
        try:
            with open("/proc/%d/stat" % p) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """Samples the proxy's RSS every 20 ms while a transfer runs; peak minus start is the growth."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.stop, self.peak = pid, threading.Event(), 0
        self.start_kib = rss_kib(pid)

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)

    def growth_mib(self):
        self.stop.set()
        self.join()
        self.peak = max(self.peak, rss_kib(self.pid))
        return (self.peak - self.start_kib) / 1024.0


# ---- proxies -------------------------------------------------------------------------------


class Proxy:
    """One proxy under test.  start() writes its config for (port, upstream) and runs it pinned
    to the proxy CPU; stop() ends it.  Each start is a fresh process."""

    name = "?"
    wrapper = []  # e.g. valgrind, for profiling runs
    ws = False  # sized for the ws metric (nginx: worker_connections)

    def __init__(self, work, cert, key):
        self.work, self.cert, self.key = work, cert, key
        self.proc = None
        self.port = None

    def argv(self, d, port, upstream):
        raise NotImplementedError

    def env(self, d):
        return None

    def start(self, upstream):
        d = tempfile.mkdtemp(prefix=self.name + "-", dir=self.work)
        self.port = free_port()
        argv = self.argv(d, self.port, upstream)
        self.log = open(os.path.join(d, "stderr.log"), "w")
        self.proc = subprocess.Popen(
            ["taskset", "-c", PROXY_CPU] + self.wrapper + argv,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env(d),
            start_new_session=True,
        )
        deadline = time.time() + (120 if self.wrapper else 20)
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited at start: see %s" % (self.name, self.log.name))
            r = run(["curl", "-sk", "--http1.1", "-o", "/dev/null", "-w", "%{http_code}",
                     "https://localhost:%d/" % self.port], timeout=10)
            if r.stdout.strip() == "200":
                # Warm the code paths and the upstream pool before any figure is taken.
                run(on_client_cpu(["h2load", "--h1", "-n", "200", "-c", "4", self.url()]), timeout=30)
                return
            time.sleep(0.2)
        raise RuntimeError("%s did not answer 200 within 20 s: see %s" % (self.name, self.log.name))

    def url(self, path="/"):
        return "https://localhost:%d%s" % (self.port, path)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def speaks_h2(self):
        r = run(["curl", "-sk", "--http2", "-o", "/dev/null", "-w", "%{http_version}", self.url()],
                timeout=10)
        return r.stdout.strip() == "2"


class Nginx(Proxy):
    name = "nginx"

    def argv(self, d, port, upstream):
        # Client and upstream connections both count, and below 1/16 of them free nginx starts
        # closing connections still waiting for their request ("reusing connections"): room
        # for twice the ws metric's websockets, the descriptor limit is the real bound.
        conns = max(20000, 4 * WS_CONNS) if self.ws else 20000
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes 1;
worker_rlimit_nofile {NOFILE};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 64; }}
    map $http_upgrade $connection_upgrade {{ default upgrade; "" ""; }}
    server {{
        listen 127.0.0.1:{port} ssl http2 backlog=4096;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.key};
        ssl_protocols TLSv1.2 TLSv1.3;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
        client_header_timeout 120s;
        client_max_body_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            # Buffer responses in memory only (SSE turns it off with X-Accel-Buffering: no);
            # stream request bodies instead of spooling them to disk.
            proxy_max_temp_file_size 0;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            proxy_busy_buffers_size 128k;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
        }}
        # Open WebUI's socket.io websockets, as its docs configure nginx for them.
        location /socket.io/ {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
""")
        return ["nginx", "-p", d, "-e", os.path.join(d, "error.log"), "-c", conf]


class H2o(Proxy):
    name = "h2o"

    def argv(self, d, port, upstream):
        os.chmod(d, 0o777)  # h2o drops to nobody before writing its pid file
        conf = os.path.join(d, "h2o.conf")
        with open(conf, "w") as f:
            f.write(f"""num-threads: 1
max-connections: 20000
limit-request-body: 17179869184
http1-request-timeout: 120
http2-idle-timeout: 120
pid-file: {d}/h2o.pid
error-log: {d}/error.log
hosts:
  "localhost:{port}":
    listen:
      host: 127.0.0.1
      port: {port}
      ssl:
        certificate-file: {self.cert}
        key-file: {self.key}
        ocsp-update-interval: 0
    paths:
      "/socket.io/":
        proxy.reverse.url: http://127.0.0.1:{upstream}/socket.io/
        proxy.preserve-host: ON
        proxy.timeout.io: 300000
        proxy.websocket: ON
        proxy.websocket.timeout: 300000
      "/":
        proxy.reverse.url: http://127.0.0.1:{upstream}/
        proxy.preserve-host: ON
        proxy.timeout.io: 300000
""")
        return ["h2o", "-c", conf]


class Caddy(Proxy):
    name = "caddy"

    def env(self, d):
        # One worker: the Go runtime on one OS thread running Go code.
        e = dict(os.environ, GOMAXPROCS="1", HOME=d, XDG_DATA_HOME=d, XDG_CONFIG_HOME=d)
        return e

    def argv(self, d, port, upstream):
        conf = os.path.join(d, "Caddyfile")
        with open(conf, "w") as f:
            f.write(f"""{{
    admin off
    auto_https off
    http_port {free_port()}
    https_port {port}
    servers {{
        protocols h1 h2
    }}
}}
https://localhost:{port} {{
    bind 127.0.0.1
    tls {self.cert} {self.key}
    reverse_proxy 127.0.0.1:{upstream} {{
        flush_interval -1
    }}
}}
""")
        return ["caddy", "run", "--config", conf, "--adapter", "caddyfile"]


class Moat(Proxy):
    name = "moat"
    binary = "moat"
    workers = 1

    def argv(self, d, port, upstream):
        return [self.binary, "run", "localhost", "127.0.0.1:%d" % upstream,
                "tls=%s,%s" % (self.cert, self.key), "--data", os.path.join(d, "data"),
                "--http-port", str(free_port()), "--https-port", str(port),
                "--listen", "127.0.0.1", "--workers", str(self.workers), "--grace", "1",
                "--access-log", "/dev/null", "--log-level", "warn",
                *os.environ.get("BENCH_MOAT_ARGS", "").split()]


# ---- upstreams (on the client CPU) ---------------------------------------------------------


def start_upstreams(work):
    """nginx serving a small static 200 and a 1 GiB file (the fast upstream), and upstream.py for
    SSE and the upload sink.  Both pinned to the client CPU."""
    d = os.path.join(work, "upstream")
    os.makedirs(d, exist_ok=True)
    big = os.path.join(d, "big")
    with open(big, "wb") as f:
        f.truncate(BIG)  # sparse: reads come from the page cache's zero page, no disk
    port, py_port = free_port(), free_port()
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1;
worker_rlimit_nofile {NOFILE};
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /big {{ root {d}; default_type application/octet-stream; }}
        location / {{ default_type text/plain; return 200 "hello from bench\\n"; }}
    }}
}}
""")
    procs = [
        subprocess.Popen(on_client_cpu(["nginx", "-p", d, "-e", os.path.join(d, "error.log"),
                                        "-c", conf]), start_new_session=True),
        subprocess.Popen(on_client_cpu([PY, os.path.join(HERE, "upstream.py"), str(py_port)]),
                         start_new_session=True),
    ]
    for p in (port, py_port):
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", p)) == 0:
                    break
            time.sleep(0.1)
    return procs, port, py_port


# ---- measurements --------------------------------------------------------------------------


def h2load(px, h1):
    args = ["h2load", "-t1", "-c64", "-D", "%g" % SECONDS, "--warm-up-time", "1"]
    args += ["--h1"] if h1 else ["-m10"]
    cpu0, t0 = cpu_seconds(px.proc.pid), time.time()
    r = run(on_client_cpu(args + [px.url()]), timeout=SECONDS + 30)
    cpu = 100.0 * (cpu_seconds(px.proc.pid) - cpu0) / (time.time() - t0)
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", r.stdout)
    codes = re.search(r"status codes: (\d+) 2xx", r.stdout)
    if not m:
        raise RuntimeError("h2load output not understood:\n" + r.stdout[-800:] + r.stderr[-400:])
    ok = codes and int(codes.group(1)) > 0
    # The proxy's CPU use tells whether it or the load generator was the limit.
    return (float(m.group(1)), cpu) if ok else None


def wrk_parse(out):
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError("wrk output not understood:\n" + out[-800:])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return float(m.group(1)), int(non2xx.group(1)) if non2xx else 0, errs.group(0) if errs else ""


def newconn(px):
    """Full TLS handshakes (wrk does not resume sessions), one request each."""
    r = run(on_client_cpu(["wrk", "-t1", "-c16", "-d", "%gs" % SECONDS, "-H", "Connection: close",
                           px.url()]), timeout=SECONDS + 30)
    rate, non2xx, _ = wrk_parse(r.stdout)
    return rate if non2xx == 0 else None


def p99(px, work):
    """~1,000 requests/s: 10 connections, each waiting 10 ms before every request."""
    lua = os.path.join(work, "delay.lua")
    with open(lua, "w") as f:
        f.write("function delay()\n    return 10\nend\n")
    r = run(on_client_cpu(["wrk", "-t1", "-c10", "-d", "%gs" % SECONDS, "--latency", "-s", lua,
                           px.url()]), timeout=SECONDS + 30)
    wrk_parse(r.stdout)
    m = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", r.stdout, re.M)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return float(m.group(1)) * scale[m.group(2)]


def established(port):
    """Established TCP connections whose local port is port (the proxy's side)."""
    n = 0
    want = ":%04X" % port
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for ln in f:
                    parts = ln.split(None, 4)
                    if parts[1].endswith(want) and parts[3] == "01":
                        n += 1
        except OSError:
            pass
    return n


def build_client(work, name="idle_conns"):
    """NAME.c (idle_conns, ws_hold) against BoringSSL (never OpenSSL's libssl), into the output
    folder."""
    out = os.path.join(work, name)
    lib = "/usr/lib/x86_64-linux-gnu/android"
    r = run(["gcc", "-O2", "-std=c11", "-Wall", "-D_GNU_SOURCE", "-isystem", "/usr/include/android",
             os.path.join(HERE, name + ".c"), "-o", out, "-L" + lib, "-Wl,-rpath," + lib,
             "-lssl", "-lcrypto"])
    if r.returncode != 0:
        sys.exit("cannot build %s.c:\n%s" % (name, r.stderr))
    return out


def build_idle_client(work):
    return build_client(work, "idle_conns")


def idle(px, client, h2=False):
    """Fresh proxy per call; KiB of proxy RSS per idle TLS connection: IDLE_CONNS connections
    with finished handshakes and no request, at most IDLE_INFLIGHT handshakes in flight.  With
    h2 the connections negotiate h2 and exchange the preface and SETTINGS (both ACKed) first,
    as a browser tab's connection does before it goes quiet."""
    base = rss_kib(px.proc.pid)
    argv = [client, str(px.port), str(IDLE_CONNS), str(IDLE_INFLIGHT)] + (["h2"] if h2 else [])
    c = subprocess.Popen(on_client_cpu(argv),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        res = json.loads(c.stdout.readline())
        time.sleep(IDLE_SETTLE_S)  # let the last handshakes' transient state go
        after = rss_kib(px.proc.pid)
        n = established(px.port)
    finally:
        try:
            c.stdin.write("\n")
            c.stdin.close()
        except BrokenPipeError:
            pass
        c.wait(timeout=30)
    if res["open"] < IDLE_CONNS * 0.98 or n < IDLE_CONNS * 0.98:
        log("%s: only %d/%d idle connections open (%d established)" %
            (px.name, res["open"], IDLE_CONNS, n))
        return None
    return (after - base) / res["open"]


def mem(px, client):
    """Does memory taken under load come back?  RSS before a load run, at its peak, and
    MEM_SETTLE_S seconds after it ended (MiB).  The load is what a busy proxy sees: IDLE_CONNS
    HTTP/2 connections opened and held (preface + SETTINGS), and while they are held a short
    burst of requests (h2load, 64 connections x 10 streams, 20k requests: about a second);
    then everything closes."""
    before = rss_kib(px.proc.pid)
    sampler = RssSampler(px.proc.pid)
    sampler.start()
    c = subprocess.Popen(on_client_cpu([client, str(px.port), str(IDLE_CONNS), str(IDLE_INFLIGHT),
                                        "h2"]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        res = json.loads(c.stdout.readline())
        r = run(on_client_cpu(["h2load", "-t1", "-c64", "-m10", "-n", "20000", px.url()]),
                timeout=120)
        if "20000 succeeded" not in r.stdout:
            log("%s: mem load incomplete: %s" % (px.name, r.stdout[-400:]))
    finally:
        try:
            c.stdin.write("\n")
            c.stdin.close()
        except BrokenPipeError:
            pass
        c.wait(timeout=30)
    sampler.growth_mib()
    time.sleep(MEM_SETTLE_S)
    after = rss_kib(px.proc.pid)
    if res["open"] < IDLE_CONNS * 0.98:
        log("%s: mem: only %d/%d connections open" % (px.name, res["open"], IDLE_CONNS))
    log("%s mem: before %.1f MiB, peak %.1f, %gs after %.1f" %
        (px.name, before / 1024.0, sampler.peak / 1024.0, MEM_SETTLE_S, after / 1024.0))
    return before / 1024.0, sampler.peak / 1024.0, after / 1024.0, after / before


def start_ws_upstream(work):
    """ws_upstream.py (python-socketio under uvicorn, as Open WebUI runs it) on the client CPU,
    pinging every WS_PING_S; a fresh one for each proxy, so none inherits another's 10,000
    disconnects still being processed.  Returns (process, port, log path)."""
    port = free_port()
    logp = os.path.join(work, "ws_upstream.log")
    lf = open(logp, "a")
    p = subprocess.Popen(on_client_cpu([PY, os.path.join(HERE, "ws_upstream.py"), str(port),
                                        "%g" % WS_PING_S, "%g" % (2 * WS_PING_S)]),
                         stdout=lf, stderr=subprocess.STDOUT, start_new_session=True)
    lf.close()
    for _ in range(100):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return p, port, logp
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    raise RuntimeError("ws_upstream.py did not listen: see %s" % logp)


def ws(px, client, up):
    """WS_CONNS socket.io websockets through the proxy, held WS_HOLD_S seconds with their
    Engine.IO pings (ws_hold.c): half over HTTP/1.1, half over HTTP/2 extended CONNECT (RFC
    8441) when the proxy does it, else all over HTTP/1.1.  Returns (held, KiB of proxy RSS per
    websocket, proxy CPU % during the hold, what carried the HTTP/2 half, Engine.IO pings
    answered per held websocket during the hold, the upstream's CPU % during the hold: near 100
    it, not the proxy, delayed the pings)."""
    # Does the proxy take an extended CONNECT end to end?  A few websockets, no hold.
    with open(os.devnull) as null:
        r = subprocess.run(on_client_cpu([client, str(px.port), "2", "2", "h2", "20"]), stdin=null,
                           capture_output=True, text=True, timeout=60)
    probe = json.loads(r.stdout.splitlines()[0]) if r.stdout else {"open": 0}
    rfc8441 = probe["open"] > 0
    log("%s: RFC 8441 probe %s" % (px.name, r.stdout.splitlines()[0] if r.stdout else r.stderr))
    time.sleep(1)
    base = rss_kib(px.proc.pid)
    c = subprocess.Popen(on_client_cpu([client, str(px.port), str(WS_CONNS), str(WS_INFLIGHT),
                                        "mixed" if rfc8441 else "h1", str(WS_OPEN_DEADLINE_S)]),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        opened = json.loads(c.stdout.readline())
        log("%s ws open: %s" % (px.name, opened))
        cpu0, up0, t0 = cpu_seconds(px.proc.pid), cpu_seconds(up.pid), time.time()
        time.sleep(WS_HOLD_S)
        dt = time.time() - t0
        cpu = 100.0 * (cpu_seconds(px.proc.pid) - cpu0) / dt
        up_cpu = 100.0 * (cpu_seconds(up.pid) - up0) / dt
        after = rss_kib(px.proc.pid)  # everything still open, after several pings
        c.stdin.write("\n")
        c.stdin.flush()
        res = json.loads(c.stdout.readline())
    finally:
        try:
            c.stdin.close()
        except BrokenPipeError:
            pass
        c.wait(timeout=60)
    log("%s ws hold: %s; RSS %.1f -> %.1f MiB, CPU %.1f %%, upstream CPU %.1f %%" %
        (px.name, res, base / 1024.0, after / 1024.0, cpu, up_cpu))
    via = "RFC 8441" if rfc8441 else "h1 (no 8441)"
    held = res["held"]
    kib = (after - base) / held if held > 0 else None
    pings = res["pongs"] / held if held > 0 else None
    return float(held), kib, cpu, via, pings, up_cpu


def sse(px):
    # The client is the measuring instrument: real-time priority keeps other work on its CPU
    # from adding a scheduler tick (4 ms) to ~1 % of the reads, the same for every proxy.
    argv = [PY, os.path.join(HERE, "sse_client.py"), str(px.port), "300", "10"]
    if run(["chrt", "-f", "1", "true"]).returncode == 0:
        argv = ["chrt", "-f", "1"] + argv
    r = run(on_client_cpu(argv), timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if r.returncode != 0:
        log("%s: sse incomplete: %s" % (px.name, res))
        return None
    return res["p50_us"] / 1000.0, res["p99_us"] / 1000.0


def transfer(px, up, bigfile):
    """1 GiB through the proxy in one direction; MiB/s and the proxy's peak RSS growth."""
    sampler = RssSampler(px.proc.pid)
    sampler.start()
    if up:
        argv = ["curl", "-sk", "--http1.1", "-H", "Expect:", "-T", bigfile, "-o", "/dev/null",
                "-w", "%{http_code} %{speed_upload} %{size_upload}", px.url("/upload")]
    else:
        argv = ["curl", "-sk", "--http1.1", "-o", "/dev/null",
                "-w", "%{http_code} %{speed_download} %{size_download}", px.url("/big")]
    r = run(on_client_cpu(argv), timeout=120)
    growth = sampler.growth_mib()
    code, speed, size = r.stdout.split()
    if code != "200" or int(float(size)) != BIG:
        log("%s: %s failed: %s %s" % (px.name, "upload" if up else "download", r.stdout, r.stderr))
        return None
    return float(speed) / (1 << 20), growth


# ---- driver --------------------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def measure_all(pxs, metrics, up_fast, up_py, work, bigfile, idle_client, ws_client=None):
    """Runs every metric REPEAT times, the proxies taking turns within each repetition, so
    that load from elsewhere on the machine falls on all of them alike rather than on
    whichever ran during a busy minute.  Returns {proxy: {key: median}}."""
    raw = {px.name: {} for px in pxs}

    def one(px, key, fn):
        try:
            v = fn()
        except Exception as e:  # noqa: BLE001 - one bad run must not lose the table
            log("%s %s: %s" % (px.name, key, e))
            v = None
        raw[px.name].setdefault(key, []).append(v)

    def start_all(upstream):
        for px in pxs:
            try:
                px.start(upstream)
            except Exception as e:  # noqa: BLE001 - measure the others anyway
                log("%s: %s" % (px.name, e))
                px.stop()

    def running():
        return [px for px in pxs if px.proc is not None]

    # A fresh process each time: nothing left from earlier load.
    fresh = [(k, fn) for k, fn in (("idle", lambda px: idle(px, idle_client)),
                                   ("idle_h2", lambda px: idle(px, idle_client, True)),
                                   ("mem", lambda px: mem(px, idle_client)))
             if k.split("_")[0] in metrics]
    for key, fn in fresh:
        for _ in range(REPEAT):
            for px in pxs:
                try:
                    px.start(up_fast)
                    one(px, key, lambda: fn(px))
                except Exception as e:  # noqa: BLE001
                    log("%s: %s" % (px.name, e))
                finally:
                    px.stop()
        for px in pxs:
            log("%s %s: %s" % (px.name, key, raw[px.name].get(key)))
    # Websockets: a fresh proxy and a fresh socket.io upstream for each run (BENCH_WS_REPEAT,
    # default 1: each run takes a minute to open 10,000 and another to hold them).
    for _ in range(WS_REPEAT if "ws" in metrics else 0):
        for px in pxs:
            up = None
            try:
                up, up_port, _ = start_ws_upstream(work)
                px.ws = True
                px.start(up_port)
                one(px, "ws", lambda: ws(px, ws_client, up))
            except Exception as e:  # noqa: BLE001
                log("%s: %s" % (px.name, e))
            finally:
                px.stop()
                px.ws = False
                if up:
                    os.killpg(up.pid, signal.SIGTERM)
                    try:
                        up.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        os.killpg(up.pid, signal.SIGKILL)
                        up.wait()
    if "ws" in metrics:
        for px in pxs:
            log("%s ws: %s" % (px.name, raw[px.name].get("ws")))
    fast = [m for m in ("h2", "h1", "newconn", "p99", "download") if m in metrics]
    slow = [m for m in ("sse", "upload") if m in metrics]
    for group, upstream in ((fast, up_fast), (slow, up_py)):
        if not group:
            continue
        start_all(upstream)
        try:
            h2 = {px.name: px.speaks_h2() for px in running()}
            for key in group:
                for _ in range(REPEAT):
                    for px in running():
                        if key == "h2" and not h2[px.name]:
                            raw[px.name]["h2"] = "n/a (no h2)"
                            continue
                        fn = {
                            "h2": lambda: h2load(px, False),
                            "h1": lambda: h2load(px, True),
                            "newconn": lambda: newconn(px),
                            "p99": lambda: p99(px, work),
                            "download": lambda: transfer(px, False, bigfile),
                            "sse": lambda: sse(px),
                            "upload": lambda: transfer(px, True, bigfile),
                        }[key]
                        one(px, key, fn)
                for px in pxs:
                    log("%s %s: %s" % (px.name, key, raw[px.name].get(key)))
        finally:
            for px in pxs:
                px.stop()

    def col(vals, i):
        return median([v[i] if isinstance(v, tuple) else None for v in vals or []])

    res = {}
    for name, r in raw.items():
        out = res[name] = {}
        for key in ("h2", "h1"):
            v = r.get(key)
            if isinstance(v, str):
                out[key] = out[key + "_eff"] = v
            elif v:
                out[key] = col(v, 0)
                # Requests per second of the proxy's own CPU time: robust to CPU stolen by
                # other work on the machine, and fair when the load generator is the limit.
                out[key + "_eff"] = median([x[0] / (x[1] / 100.0) if x and x[1] > 0 else None
                                            for x in v])
        for key in ("newconn", "p99", "idle", "idle_h2"):
            if key in r:
                out[key] = median(r[key])
        for key, a, b in (("sse", "sse_p50", "sse_p99"), ("download", "down_speed", "down_rss"),
                          ("upload", "up_speed", "up_rss")):
            if key in r:
                out[a], out[b] = col(r[key], 0), col(r[key], 1)
        if "mem" in r:
            for i, k in enumerate(("mem_before", "mem_peak", "mem_after", "mem_back")):
                out[k] = col(r["mem"], i)
        if "ws" in r:
            for i, k in enumerate(("ws_held", "ws_kib", "ws_cpu", None, "ws_pings", "ws_upcpu")):
                if k:
                    out[k] = col(r["ws"], i)
            out["ws_via"] = next((v[3] for v in r["ws"] if isinstance(v, tuple)), None)
    return res


ROWS = [
    # key, label, higher is better, format, target (text)
    ("h2", "h2 req/s (c64 m10)", True, "%.0f", ">= 1.2x h2o"),
    ("h2_eff", "  h2 req per proxy CPU-second", True, "%.0f", "-"),
    ("h1", "h1-over-TLS req/s (c64)", True, "%.0f", ">= 1.3x h2o"),
    ("h1_eff", "  h1 req per proxy CPU-second", True, "%.0f", "-"),
    ("newconn", "new TLS conn/s (1 req each)", True, "%.0f", ">= 1.2x h2o"),
    ("idle", "KiB per idle TLS conn (http/1.1)", False, "%.1f", "<= 4 KiB"),
    ("idle_h2", "KiB per idle TLS conn (h2, preface+SETTINGS)", False, "%.1f", "<= 6 KiB"),
    ("mem_before", "RSS before load MiB", False, "%.1f", "-"),
    ("mem_peak", "  RSS peak under load MiB", False, "%.1f", "-"),
    ("mem_after", "  RSS 10 s after load MiB", False, "%.1f", "-"),
    ("mem_back", "  RSS 10 s after / before", False, "%.2f", "<= 1.25"),
    ("p99", "p99 ms @ ~1k req/s", False, "%.2f", "-"),
    ("sse_p50", "SSE relay delay p50 ms", False, "%.3f", "-"),
    ("sse_p99", "SSE relay delay p99 ms", False, "%.3f", "< 1 ms"),
    ("up_speed", "1 GiB upload MiB/s", True, "%.0f", "-"),
    ("up_rss", "  upload RSS growth MiB", False, "%.1f", "< 16 MiB"),
    ("down_speed", "1 GiB download MiB/s", True, "%.0f", "-"),
    ("down_rss", "  download RSS growth MiB", False, "%.1f", "< 16 MiB"),
    ("ws_held", "websockets held %g s (of %d)" % (WS_HOLD_S, WS_CONNS), True, "%.0f", "all"),
    ("ws_via", "  their HTTP/2 half went over", True, "%s", "-"),
    ("ws_kib", "  KiB proxy RSS per websocket", False, "%.1f", "-"),
    ("ws_cpu", "  proxy CPU % while holding", False, "%.1f", "-"),
    ("ws_pings", "  pings answered per websocket", True, "%.1f", "~%g" % (WS_HOLD_S / WS_PING_S)),
    ("ws_upcpu", "  socket.io upstream CPU %", False, "%.0f", "< 100"),
]


def table(results, proxies):
    names = {"nginx": "nginx", "h2o": "h2o", "caddy": "Caddy", "moat": "moat"}
    ref = [p for p in ("h2o", "nginx", "caddy") if p in proxies and "moat" in proxies]
    head = ["metric"] + [names[p] for p in proxies] + ["moat/" + names[p] for p in ref] + ["target"]
    lines = []
    for key, label, _, fmt, target in ROWS:
        if not any(key in results.get(p, {}) for p in proxies):
            continue
        row = [label]
        for p in proxies:
            v = results.get(p, {}).get(key)
            row.append(v if isinstance(v, str) else ("-" if v is None else fmt % v))
        mv = results.get("moat", {}).get(key)
        for p in ref:
            v = results.get(p, {}).get(key)
            ok = isinstance(mv, (int, float)) and isinstance(v, (int, float)) and v > 0
            row.append("%.2f" % (mv / v) if ok else "n/a")
        row.append(target)
        lines.append(row)
    widths = [max(len(str(r[i])) for r in lines + [head]) for i in range(len(head))]
    out = []
    for r in [head, ["-" * w for w in widths]] + lines:
        out.append("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def profile(kind, work, cert, key, up_fast):
    """The h1 (or, with BENCH_PROFILE_H2=1, h2) proxied path of moat under perf (cpu-clock samples, since this VM has no hardware
    counters), callgrind (instruction counts) or strace -c (syscalls per request)."""
    px = Moat(work, cert, key)
    n = int(os.environ.get("BENCH_PROFILE_REQUESTS", "20000"))
    if kind == "callgrind":
        px.wrapper = ["valgrind", "--tool=callgrind", "--callgrind-out-file=%s/callgrind.out" % work]
    px.start(up_fast)
    try:
        proto = ["-m10"] if os.environ.get("BENCH_PROFILE_H2") == "1" else ["--h1"]
        load = on_client_cpu(["h2load"] + proto + ["-t1", "-c64", "-n", str(n), px.url()])
        if kind == "perf":
            rec = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "4000", "-g", "-o",
                                    os.path.join(work, "perf.data"), "-p", str(px.proc.pid)],
                                   stderr=subprocess.DEVNULL)
        elif kind == "strace":
            rec = subprocess.Popen(["strace", "-c", "-f", "-o", os.path.join(work, "strace.txt"),
                                    "-p", str(px.proc.pid)])
            time.sleep(1)
        elif kind == "callgrind":
            rec = None
            run(["callgrind_control", "-z", str(px.proc.pid)])  # count the measured run only
        r = run(load, timeout=600)
        print(re.search(r"finished in .*", r.stdout).group(0), "|",
              re.search(r"status codes: .*", r.stdout).group(0))
        if rec:
            rec.send_signal(signal.SIGINT)
            rec.wait(timeout=60)
        if kind == "callgrind":
            run(["callgrind_control", "-d", str(px.proc.pid)])
    finally:
        px.stop()
    log("%s output in %s (%d requests)" % (kind, work, n))


def main():
    global PROXY_CPU
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=["perf", "callgrind", "strace"], default=None)
    ap.add_argument("--moat", required=True)
    ap.add_argument("--moat-workers", type=int, default=1)
    ap.add_argument("--proxy-cpus", default=PROXY_CPU,
                    help="taskset list for the proxies, e.g. 0-1 with --moat-workers 2")
    ap.add_argument("--proxies", default=",".join(ALL_PROXIES))
    ap.add_argument("--metrics", default=",".join(ALL_METRICS))
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    # Stopping the bench (Ctrl-C, kill) must still stop every proxy and upstream it started:
    # turn both signals into exceptions so the finally blocks run.  A shell's background job
    # inherits SIGINT ignored, hence the explicit handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    proxies = a.proxies.split(",")
    metrics = a.metrics.split(",")
    Moat.binary = os.path.abspath(a.moat)
    Moat.workers = a.moat_workers
    PROXY_CPU = a.proxy_cpus
    work = a.out or tempfile.mkdtemp(prefix="moat-bench-")
    os.makedirs(work, exist_ok=True)
    os.chmod(work, 0o755)  # nginx and h2o workers run as nobody
    cert, key = os.path.join(work, "cert.pem"), os.path.join(work, "key.pem")
    # One ECDSA P-256 certificate for every proxy, so the handshakes cost the same work.
    r = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", key, "-out", cert, "-days", "30", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
    if r.returncode != 0:
        sys.exit("openssl: " + r.stderr)
    idle_client = build_idle_client(work) if "idle" in metrics or "mem" in metrics else None
    ws_client = build_client(work, "ws_hold") if "ws" in metrics else None
    procs, up_fast, up_py = start_upstreams(work)
    bigfile = os.path.join(work, "upstream", "big")
    if a.profile:
        try:
            profile(a.profile, work, cert, key, up_fast)
        finally:
            for pr in procs:
                os.killpg(pr.pid, signal.SIGTERM)
                pr.wait()
        return
    results = {}
    load_start = loadavg()
    t0 = time.time()
    classes = {"nginx": Nginx, "h2o": H2o, "caddy": Caddy, "moat": Moat}
    log("proxies %s; load average %s" % (",".join(proxies), load_start))
    try:
        pxs = [classes[p](work, cert, key) for p in proxies]
        results = measure_all(pxs, metrics, up_fast, up_py, work, bigfile, idle_client,
                              ws_client)
    finally:
        for pr in procs:
            os.killpg(pr.pid, signal.SIGTERM)
            pr.wait()
    tbl = table(results, proxies)
    info = ("%d-core machine; proxy on CPU %s, clients+upstreams on CPU %s; median of %d runs of "
            "%gs; load average %s at start, %s at end; %.0f s total" %
            (os.cpu_count(), PROXY_CPU, CLIENT_CPU, REPEAT, SECONDS, load_start, loadavg(),
             time.time() - t0))
    if "ws" in metrics:
        info += ("; ws: %d run(s) of %d websockets held %g s, socket.io pinging every %g s" %
                 (WS_REPEAT, WS_CONNS, WS_HOLD_S, WS_PING_S))
    print(tbl)
    print(info)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"results": results, "info": info}, f, indent=1)
    with open(os.path.join(work, "table.txt"), "w") as f:
        f.write(tbl + "\n" + info + "\n")
    log("results in %s" % work)
    if os.environ.get("BENCH_KEEP") != "1":
        shutil.rmtree(os.path.join(work, "upstream"), ignore_errors=True)


if __name__ == "__main__":
    main()
