#!/usr/bin/python3
"""Soak: moat in front of the stand-in Open WebUI for MINUTES under mixed traffic, with
reloads and app restarts, sampled every 10 s. Run it through tests/soak.sh (which builds
moat first); by hand:

    /usr/bin/python3 tests/soak.py --moat build-soak/moat --minutes 30 --out /tmp/soak-run

What runs (127.0.0.1 only, every process started here is stopped here by PID, Ctrl-C too):
- tests/fixtures/standin.py under uvicorn on a fixed port, and moat on free ports
  (`moat run --config Moatfile --listen 127.0.0.1 ...`), clients verifying the certificate
  against `moat ca-root`.
- Traffic (moderate: ~10 requests/s plus streams, for a 2-core machine shared with other
  work): 4 page/API loaders (GET / as a browser page load, /api/config, /health,
  /api/v1/files/, /download 256 KiB; two over HTTP/1.1, two over HTTP/2), 3 SSE chat
  streams back to back (2-6 s of tokens each, every token checked, h1 and h2), 1 uploader
  (1-5 MiB multipart to /api/v1/files/, size and SHA-256 checked, h1 and h2 in turn), and
  20 socket.io websockets held open (16 over HTTP/1.1, 4 over HTTP/2 extended CONNECT,
  RFC 8441), answering Engine.IO pings and sending a chat event every 10-30 s whose 3
  deltas must come back.
- Every --reload-every s (30) the Moatfile is rewritten in place (a new comment line, same
  site) and moat gets SIGHUP; every --restart-every s (120, first at 60 s) the app is
  stopped (SIGTERM, uvicorn's graceful stop), left away --app-away s (3) and started again
  on the same port.
- Every 10 s a row goes to OUT/soak.csv; at the end OUT/soak.png and a summary.

A failure is "during a restart" when the request (or websocket) was in flight at some
moment between 0.5 s before the app was told to stop and 1 s after it answered /health
again; every other failure counts as "outside". Details of each failure: OUT/failures.log.

Exit code 1 when: any failure outside the restart windows; moat died; the growth rule below
fired for RSS or for open fds; or, after the traffic stopped and 10 s of quiet, moat holds
more fds than at the idle baseline taken before the traffic (+2).
Growth rule: over the last 10 minutes of samples (the last half, for runs shorter than 20
minutes), the least-squares slope is above max(1 % of the median, 64 KiB) per minute for
RSS (1 fd per minute for fds) AND the window's maximum is a new high, above 1.10 x the
maximum of all earlier samples (+ 1 MiB for RSS, + 8 for fds). Something that keeps
climbing to new highs grows without bound; a level that wobbles under an earlier peak
does not.
"""

import argparse
import asyncio
import collections
import csv
import hashlib
import json
import os
import random
import signal
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

import httpx  # noqa: E402

import h2util as H  # noqa: E402
from helpers import FIXTURES, PYTHON, free_port, stop_process, tail, wait_port  # noqa: E402

SAMPLE_EVERY = 10.0
WINDOW_BEFORE, WINDOW_AFTER = 0.5, 1.0
UPSTREAM_WAIT = 10

stop_ev = threading.Event()      # traffic stops
T0 = time.monotonic()


def now():
    return time.monotonic()


def el(t):
    return round(t - T0, 2)


# ---------------------------------------------------------------------------------------------
# Shared counters


class Stats:
    def __init__(self, out):
        self.lock = threading.Lock()
        self.ok = collections.Counter()
        self.fail_restart = collections.Counter()
        self.fail_outside = collections.Counter()
        self.windows = []        # [stop asked, healthy again or None]
        self.reloads = []        # times
        self.ws_open = 0
        self.ws_max = 0
        self.flog = open(out / "failures.log", "a", buffering=1)

    def record_ok(self, kind):
        with self.lock:
            self.ok[kind] += 1

    def in_restart(self, t0, t1):
        for a, b in self.windows:
            b = float("inf") if b is None else b + WINDOW_AFTER
            if t0 <= b and t1 >= a - WINDOW_BEFORE:
                return True
        return False

    def record_fail(self, t0, kind, detail, t1=None):
        t1 = now() if t1 is None else t1
        with self.lock:
            during = self.in_restart(t0, t1)
            (self.fail_restart if during else self.fail_outside)[kind] += 1
            last_reload = max((r for r in self.reloads if r <= t1), default=None)
        since = "" if last_reload is None else f" ({t1 - last_reload:.1f}s after a reload)"
        self.flog.write(f"{el(t0):9.2f}..{el(t1):9.2f} {'RESTART' if during else 'OUTSIDE'} "
                        f"{kind}: {detail}{since}\n")

    def ws_delta(self, d):
        with self.lock:
            self.ws_open += d
            self.ws_max = max(self.ws_max, self.ws_open)

    def totals(self):
        with self.lock:
            return (sum(self.ok.values()), sum(self.fail_restart.values()),
                    sum(self.fail_outside.values()), self.ws_open)


# ---------------------------------------------------------------------------------------------
# Processes: the stand-in app and moat


class App:
    def __init__(self, out, port):
        self.port, self.proc = port, None
        self.log = out / "standin.log"

    def launch(self):
        env = dict(os.environ, STANDIN_NAME="soak", PYTHONDONTWRITEBYTECODE="1")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "uvicorn", "standin:asgi_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--no-proxy-headers", "--log-level", "warning"],
                cwd=FIXTURES, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout=30.0):
        deadline = now() + timeout
        while now() < deadline and self.proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1,
                              trust_env=False)
                if r.status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return False

    def stop(self):
        if self.proc is not None:
            rc = stop_process(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None
            return rc


class Moat:
    def __init__(self, binary, out, app_port):
        self.bin, self.out, self.app_port = binary, out, app_port
        self.config = out / "Moatfile"
        self.data = out / "data"
        self.data.mkdir(exist_ok=True)
        self.ca = out / "ca.pem"
        self.stderr = out / "moat.stderr.log"
        self.proc = None
        self.generation = 0

    def write_config(self):
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(f"# tests/soak.py, generation {self.generation}\n"
                       f"localhost 127.0.0.1:{self.app_port} upstream_wait={UPSTREAM_WAIT}s\n")
        os.replace(tmp, self.config)
        self.generation += 1

    def start(self):
        for _ in range(3):
            self.http_port, self.https_port = free_port(), free_port()
            self.write_config()
            self.proc = subprocess.Popen(
                [self.bin, "run", "--config", str(self.config), "--listen", "127.0.0.1",
                 "--data", str(self.data), "--http-port", str(self.http_port),
                 "--https-port", str(self.https_port), "--log-level", "info",
                 "--access-log", str(self.out / "access.log")],
                cwd=self.out, stdin=subprocess.DEVNULL,
                stdout=open(self.out / "moat.stdout.log", "ab"),
                stderr=open(self.stderr, "ab"), start_new_session=True)
            if wait_port(self.https_port, 15, self.proc) and wait_port(self.http_port, 3, self.proc):
                cp = subprocess.run([self.bin, "ca-root", "--data", str(self.data)],
                                    capture_output=True, timeout=15)
                if cp.returncode != 0 or b"BEGIN CERTIFICATE" not in cp.stdout:
                    raise RuntimeError(f"moat ca-root failed: {cp.stderr!r}")
                self.ca.write_bytes(cp.stdout)
                return
            stop_process(self.proc, signal.SIGKILL)
        raise RuntimeError(f"moat did not start:\n{tail(self.stderr)}")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def reload(self):
        self.write_config()
        self.proc.send_signal(signal.SIGHUP)

    def stop(self):
        if self.proc is not None:
            rc = stop_process(self.proc, signal.SIGTERM, timeout=40)
            return rc

    # /proc figures
    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fd_inodes(self):
        fds, inodes = 0, set()
        d = f"/proc/{self.proc.pid}/fd"
        for name in os.listdir(d):
            fds += 1
            try:
                link = os.readlink(f"{d}/{name}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        return fds, inodes

    def sample(self):
        """(RSS KiB, open fds, established client connections, established upstream
        connections), the connections being moat's own sockets (its fds' inodes matched in
        /proc/net/tcp)."""
        rss = self.rss_kib()
        fds, inodes = self.fd_inodes()
        client = upstream = 0
        fronts = {self.https_port, self.http_port}
        with open(f"/proc/{self.proc.pid}/net/tcp") as f:
            next(f)
            for line in f:
                p = line.split()
                if p[3] != "01" or p[9] not in inodes:
                    continue
                lport = int(p[1].split(":")[1], 16)
                rport = int(p[2].split(":")[1], 16)
                if lport in fronts:
                    client += 1
                elif rport == self.app_port:
                    upstream += 1
        return rss, fds, client, upstream


# ---------------------------------------------------------------------------------------------
# Traffic


def http_client(moat, http2):
    return httpx.Client(verify=str(moat.ca), http2=http2, trust_env=False,
                        timeout=httpx.Timeout(40.0, connect=15.0))


def page_worker(moat, stats, idx, http2, rate):
    rng = random.Random(1000 + idx)
    base = f"https://localhost:{moat.https_port}"
    proto = "h2" if http2 else "h1"
    client = http_client(moat, http2)
    try:
        while not stop_ev.is_set():
            t0 = now()
            x = rng.random()
            if x < 0.45:
                kind, path, hdrs = "page", "/", {"Accept": "text/html,application/xhtml+xml"}
            elif x < 0.65:
                kind, path, hdrs = "api", "/api/config", {"Accept": "application/json"}
            elif x < 0.8:
                kind, path, hdrs = "api", "/health", {}
            elif x < 0.9:
                kind, path, hdrs = "api", "/api/v1/files/", {}
            else:
                kind, path, hdrs = "download", "/download?size=262144", {}
            try:
                r = client.get(base + path, headers=hdrs)
                body = r.content
                if r.status_code != 200:
                    raise ValueError(f"status {r.status_code} {body[:80]!r}")
                if kind == "page" and b"standin soak" not in body:
                    raise ValueError(f"not the app's page: {body[:80]!r}")
                if kind == "download" and len(body) != 262144:
                    raise ValueError(f"download of {len(body)} bytes")
                stats.record_ok(kind)
            except Exception as e:
                stats.record_fail(t0, f"{kind}-{proto}", f"{path}: {e!r:.300}")
                client.close()
                client = http_client(moat, http2)
            stop_ev.wait(max(0.0, t0 + rng.expovariate(rate) - now()))
    finally:
        client.close()


def sse_worker(moat, stats, idx, http2):
    rng = random.Random(2000 + idx)
    url = f"https://localhost:{moat.https_port}/api/chat/completions"
    proto = "h2" if http2 else "h1"
    client = http_client(moat, http2)
    try:
        while not stop_ev.is_set():
            n = rng.randint(40, 120)
            t0 = now()
            try:
                got, done, buf = [], False, b""
                with client.stream("POST", url, json={"tokens": n, "gap": 0.05}) as r:
                    if r.status_code != 200:
                        raise ValueError(f"status {r.status_code}")
                    for chunk in r.iter_raw():
                        buf += chunk
                        while b"\n\n" in buf:
                            ev, buf = buf.split(b"\n\n", 1)
                            if ev == b"data: [DONE]":
                                done = True
                            elif ev.startswith(b"data: "):
                                got.append(json.loads(ev[6:])["i"])
                if got != list(range(n)) or not done:
                    raise ValueError(f"{len(got)} of {n} tokens, done={done}")
                stats.record_ok("sse")
            except Exception as e:
                stats.record_fail(t0, f"sse-{proto}", f"{n} tokens: {e!r:.300}")
                client.close()
                client = http_client(moat, http2)
            stop_ev.wait(rng.uniform(0.5, 2.0))
    finally:
        client.close()


def upload_worker(moat, stats, every):
    rng = random.Random(3000)
    blob = os.urandom(6 << 20)
    url = f"https://localhost:{moat.https_port}/api/v1/files/"
    clients = {False: http_client(moat, False), True: http_client(moat, True)}
    i = 0
    try:
        while not stop_ev.is_set():
            http2 = bool(i % 2)
            i += 1
            size = rng.randint(1 << 20, 5 << 20)
            off = rng.randint(0, len(blob) - size)
            data = blob[off:off + size]
            digest = hashlib.sha256(data).hexdigest()
            t0 = now()
            try:
                r = clients[http2].post(url, files={"file": (f"soak{i}.bin", data,
                                                             "application/octet-stream")})
                if r.status_code != 200:
                    raise ValueError(f"status {r.status_code}")
                j = r.json()
                if j.get("size") != size or j.get("sha256") != digest:
                    raise ValueError(f"app got {j.get('size')} bytes {j.get('sha256')}")
                stats.record_ok("upload")
            except Exception as e:
                stats.record_fail(t0, f"upload-{'h2' if http2 else 'h1'}",
                                  f"{size} bytes: {e!r:.300}")
                clients[http2].close()
                clients[http2] = http_client(moat, http2)
            stop_ev.wait(max(0.0, t0 + every - now()))
    finally:
        for c in clients.values():
            c.close()


CHAT = '42["chat",{"n":3,"gap":0.02}]'


class SioSession:
    """Engine.IO 4 / Socket.IO 5 over a websocket, message by message: answers pings, sends
    a chat event now and then and checks its 3 deltas and the done event arrive."""

    def __init__(self, stats, rng, kind):
        self.stats, self.rng, self.kind = stats, rng, kind
        self.state = "open?"     # -> "connect?" -> "up"
        self.chat_t0 = None
        self.deltas = 0
        self.next_chat = None

    def on_message(self, m, send):
        if m == "2":
            send("3")
        elif self.state == "open?" and m.startswith("0{"):
            self.state = "connect?"
            send("40")
        elif self.state == "connect?" and m.startswith("40"):
            self.state = "up"
            self.next_chat = now() + self.rng.uniform(5, 30)
        elif m.startswith('42["delta"'):
            self.deltas += 1
        elif m.startswith('42["done"') and self.chat_t0 is not None:
            if self.deltas == 3:
                self.stats.record_ok("ws-chat")
            else:
                self.stats.record_fail(self.chat_t0, f"ws-chat-{self.kind}",
                                       f"{self.deltas} deltas of 3")
            self.chat_t0 = None
            self.next_chat = now() + self.rng.uniform(10, 30)

    def tick(self, send):
        if self.state != "up":
            return
        t = now()
        if self.chat_t0 is None and t >= self.next_chat:
            self.chat_t0, self.deltas = t, 0
            send(CHAT)
        elif self.chat_t0 is not None and t - self.chat_t0 > 15:
            self.stats.record_fail(self.chat_t0, f"ws-chat-{self.kind}",
                                   f"no done within 15 s ({self.deltas} deltas)")
            self.chat_t0 = None
            self.next_chat = t + self.rng.uniform(10, 30)


async def ws_h1_one(moat, stats, idx, ctx):
    import websockets
    rng = random.Random(4000 + idx)
    url = f"wss://localhost:{moat.https_port}/ws/socket.io/?EIO=4&transport=websocket"
    await asyncio.sleep(idx * 0.2)
    while not stop_ev.is_set():
        t0 = now()
        up_since = None
        s = SioSession(stats, rng, "h1")
        try:
            async with websockets.connect(url, ssl=ctx, server_hostname="localhost",
                                          open_timeout=30, ping_interval=20, ping_timeout=20,
                                          close_timeout=5) as w:
                out = []
                while not stop_ev.is_set():
                    if s.state != "up" and now() - t0 > 30:
                        raise TimeoutError(f"socket.io handshake stuck in {s.state}")
                    try:
                        m = await asyncio.wait_for(w.recv(), 0.5)
                        s.on_message(m, out.append)
                    except asyncio.TimeoutError:
                        pass
                    s.tick(out.append)
                    for x in out:
                        await w.send(x)
                    out.clear()
                    if s.state == "up" and up_since is None:
                        up_since = now()
                        stats.record_ok("ws-connect")
                        stats.ws_delta(+1)
        except Exception as e:
            if up_since is not None:
                stats.record_fail(now(), "ws-drop-h1", f"open {now() - up_since:.0f}s: {e!r:.200}")
            else:
                stats.record_fail(t0, "ws-connect-h1", f"{e!r:.300}")
        finally:
            if up_since is not None:
                stats.ws_delta(-1)
        if not stop_ev.is_set():
            await asyncio.sleep(1.0)


def ws_h1_thread(moat, stats, n):
    ctx = ssl.create_default_context(cafile=str(moat.ca))
    ctx.set_alpn_protocols(["http/1.1"])

    async def main():
        await asyncio.gather(*(ws_h1_one(moat, stats, i, ctx) for i in range(n)))

    asyncio.run(main())


def _ws_frame(payload, opcode=1):
    mask = os.urandom(4)
    data = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    hdr = bytes([0x80 | opcode])
    hdr += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    return hdr + mask + data


def _ws_parse(buf):
    out = []
    while len(buf) >= 2:
        n, off = buf[1] & 0x7f, 2
        if n == 126:
            if len(buf) < 4:
                break
            n, off = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, off = struct.unpack(">Q", buf[2:10])[0], 10
        if len(buf) < off + n:
            break
        out.append((buf[0] & 0x0f, buf[off:off + n]))
        buf = buf[off + n:]
    return out, buf


def ws_h2_thread(moat, stats, idx):
    """One socket.io websocket over an HTTP/2 extended CONNECT stream, again and again."""
    rng = random.Random(5000 + idx)
    time.sleep(idx * 0.3)
    while not stop_ev.is_set():
        t0 = now()
        up_since = None
        c = None
        s = SioSession(stats, rng, "h2")
        try:
            c = H.RawH2(moat.https_port, moat.ca, timeout=15)
            c.handshake()
            if c.server_settings.get(H.S_ENABLE_CONNECT_PROTOCOL) != 1:
                raise ValueError("no SETTINGS_ENABLE_CONNECT_PROTOCOL")
            c.request(1, [(":method", "CONNECT"), (":protocol", "websocket"),
                          (":scheme", "https"), (":authority", f"localhost:{moat.https_port}"),
                          (":path", "/ws/socket.io/?EIO=4&transport=websocket"),
                          ("sec-websocket-version", "13")], end_stream=False)
            f = c.read_until(lambda f: (f.sid == 1 and f.type in (H.HEADERS, H.RST_STREAM))
                             or f.type == H.GOAWAY, 30)
            if f is None or f.type != H.HEADERS or dict(f.headers or []).get(":status") != "200":
                raise ValueError(f"CONNECT answered {f and (f.type, f.headers)}")
            buf = b""

            def send(text):
                c.send_frame(H.DATA, 0, 1, _ws_frame(text.encode()))

            while not stop_ev.is_set():
                if s.state != "up" and now() - t0 > 30:
                    raise TimeoutError(f"socket.io handshake stuck in {s.state}")
                f = c.read_until(lambda f: True, 0.5)
                # RawH2 keeps every frame; keep only those not looked at yet.
                del c.frames[:c.cursor]
                c.cursor = 0
                if f is None and c.closed:
                    raise ConnectionError("connection closed")
                if f is not None:
                    if f.type == H.DATA and f.sid == 1:
                        if f.payload:
                            inc = struct.pack(">I", len(f.payload))
                            c.send_frame(H.WINDOW_UPDATE, 0, 0, inc)
                            c.send_frame(H.WINDOW_UPDATE, 0, 1, inc)
                        got, buf = _ws_parse(buf + f.payload_data())
                        for op, m in got:
                            if op == 8:
                                raise ConnectionError(f"websocket close {m[:2].hex()}")
                            if op == 9:  # uvicorn pings every 20 s and wants the pong
                                c.send_frame(H.DATA, 0, 1, _ws_frame(m, 10))
                            if op == 1:
                                s.on_message(m.decode(errors="replace"), send)
                        if f.flags & H.END_STREAM:
                            raise ConnectionError("stream ended")
                    elif f.type == H.RST_STREAM and f.sid == 1:
                        raise ConnectionError(f"RST_STREAM {f.error_code}")
                    elif f.type == H.PING and not f.flags & H.ACK:
                        c.send_frame(H.PING, H.ACK, 0, f.payload)
                    elif f.type == H.SETTINGS and not f.flags & H.ACK:
                        c.send_frame(H.SETTINGS, H.ACK, 0)
                    elif f.type == H.GOAWAY:
                        last = struct.unpack(">I", f.payload[:4])[0] & 0x7fffffff
                        if last < 1:
                            raise ConnectionError("GOAWAY before our stream")
                s.tick(send)
                if s.state == "up" and up_since is None:
                    up_since = now()
                    stats.record_ok("ws-connect")
                    stats.ws_delta(+1)
        except Exception as e:
            if up_since is not None:
                stats.record_fail(now(), "ws-drop-h2", f"open {now() - up_since:.0f}s: {e!r:.200}")
            else:
                stats.record_fail(t0, "ws-connect-h2", f"{e!r:.300}")
        finally:
            if up_since is not None:
                stats.ws_delta(-1)
            if c is not None:
                c.close()
        stop_ev.wait(1.0)


# ---------------------------------------------------------------------------------------------
# Sampling, growth rule, plot


COLUMNS = ["elapsed_s", "requests_ok", "failures_restart", "failures_outside", "rss_kib",
           "fds", "client_conns", "upstream_conns", "websockets_open", "reloads",
           "app_restarts"]


class Sampler(threading.Thread):
    def __init__(self, moat, stats, path):
        super().__init__(daemon=True)
        self.moat, self.stats, self.path = moat, stats, path
        self.rows = []
        self.halt = threading.Event()

    def take(self):
        try:
            rss, fds, client, upstream = self.moat.sample()
        except (OSError, StopIteration):
            return
        ok, fr, fo, ws = self.stats.totals()
        with self.stats.lock:
            reloads, restarts = len(self.stats.reloads), len(self.stats.windows)
        row = [round(now() - T0), ok, fr, fo, rss, fds, client, upstream, ws, reloads, restarts]
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(row)
        print(f"[soak {row[0]:5d}s] ok {ok} fail {fr}/{fo} (restart/outside) rss {rss} KiB "
              f"fds {fds} conns {client}+{upstream} ws {ws}", flush=True)

    def run(self):
        nxt = now()
        while not self.halt.is_set():
            self.take()
            nxt += SAMPLE_EVERY
            self.halt.wait(max(0.0, nxt - now()))


def slope_per_min(xs, ys):
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    if den == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 60.0


def growth(rows, col, min_slope, floor_slope, slack):
    """(grows?, slope per minute, explanation) by the rule in the module docstring."""
    t_end = rows[-1][0]
    span = 600 if t_end >= 1200 else t_end / 2
    win = [r for r in rows if r[0] >= t_end - span]
    before = [r for r in rows if r[0] < t_end - span]
    if len(win) < 3 or not before:
        return False, 0.0, "too few samples"
    xs, ys = [r[0] for r in win], [r[col] for r in win]
    s = slope_per_min(xs, ys)
    limit = max(min_slope * statistics.median(ys), floor_slope)
    high = max(r[col] for r in before)
    new_high = max(ys) > 1.10 * high + slack
    grows = s > limit and new_high
    return grows, s, (f"slope {s:+.1f}/min over the last {span / 60:.1f} min (limit {limit:.1f}), "
                      f"window max {max(ys)} vs earlier max {high} (new high: {new_high})")


def plot(rows, windows, reloads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r[0] / 60 for r in rows]
    fig, ax = plt.subplots(4, 1, figsize=(8, 8), sharex=True)
    ax[0].plot(t, [r[2] for r in rows], label="failures during app restarts")
    ax[0].plot(t, [r[3] for r in rows], label="failures outside")
    ax[0].set_ylabel("failures (cum.)")
    ax[1].plot(t, [r[4] / 1024 for r in rows], color="tab:red")
    ax[1].set_ylabel("moat RSS (MiB)")
    ax[1].set_ylim(bottom=0)
    ax[2].plot(t, [r[5] for r in rows], color="tab:purple")
    ax[2].set_ylabel("moat open fds")
    ax[2].set_ylim(bottom=0)
    ax[3].plot(t, [r[6] for r in rows], label="client conns")
    ax[3].plot(t, [r[7] for r in rows], label="upstream conns")
    ax[3].plot(t, [r[8] for r in rows], label="websockets open")
    ax[3].set_ylabel("connections")
    ax[3].set_xlabel("minutes (shaded: app away; ticks: reloads)")
    for a in ax:
        for w0, w1 in windows:
            a.axvspan((w0 - T0) / 60, ((w1 or w0) - T0) / 60, color="orange", alpha=0.3, lw=0)
        a.grid(alpha=0.3)
    for r in reloads:
        ax[3].axvline((r - T0) / 60, ymax=0.08, color="gray", lw=0.8)
    ax[0].legend(loc="upper left", fontsize=8)
    ax[3].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"moat soak: {rows[-1][0] / 60:.0f} min, {rows[-1][1]} requests ok")
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def warm_up(moat):
    """One of each kind (h1, h2, websocket) so lazily opened fds exist before the idle
    baseline."""
    base = f"https://localhost:{moat.https_port}"
    for h2 in (False, True):
        with http_client(moat, h2) as c:
            c.get(base + "/", headers={"Accept": "text/html"}).raise_for_status()
            c.post(base + "/api/v1/files/", files={"file": ("w", b"x" * 1000)}).raise_for_status()
    c = H.RawH2(moat.https_port, moat.ca)
    c.handshake()
    c.get(1, "/health")
    c.response(1)
    c.close()


def idle_sample(moat, quiet):
    time.sleep(quiet)
    return moat.sample()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moat", required=True)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reload-every", type=float, default=30.0)
    ap.add_argument("--restart-every", type=float, default=120.0)
    ap.add_argument("--first-restart", type=float, default=60.0)
    ap.add_argument("--app-away", type=float, default=3.0)
    ap.add_argument("--ws-h1", type=int, default=16)
    ap.add_argument("--ws-h2", type=int, default=4)
    a = ap.parse_args()
    global T0
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("soak.csv", "failures.log", "summary.txt"):
        (out / name).unlink(missing_ok=True)

    # Ctrl-C / SIGTERM end the run early but still go through the cleanup below.
    interrupted = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        stop_ev.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    stats = Stats(out)
    app = App(out, free_port())
    moat = Moat(str(Path(a.moat).resolve()), out, app.port)
    threads = []
    sampler = None
    stops = []
    rc = 0
    summary = []
    try:
        app.launch()
        if not app.wait_healthy():
            raise RuntimeError(f"stand-in did not start:\n{tail(app.log)}")
        moat.start()
        print(f"soak: app 127.0.0.1:{app.port} (pid {app.proc.pid}), moat https "
              f"127.0.0.1:{moat.https_port} http {moat.http_port} (pid {moat.proc.pid}), "
              f"out {out}", flush=True)
        warm_up(moat)
        base_idle = idle_sample(moat, 6.0)
        print(f"soak: idle baseline rss {base_idle[0]} KiB, fds {base_idle[1]}, "
              f"conns {base_idle[2]}+{base_idle[3]}", flush=True)

        with open(out / "soak.csv", "w", newline="") as f:
            csv.writer(f).writerow(COLUMNS)
        T0 = now()
        specs = [(page_worker, (moat, stats, i, i % 2 == 1, 2.5)) for i in range(4)]
        specs += [(sse_worker, (moat, stats, i, i == 1)) for i in range(3)]
        specs += [(upload_worker, (moat, stats, 4.0))]
        specs += [(ws_h1_thread, (moat, stats, a.ws_h1))]
        specs += [(ws_h2_thread, (moat, stats, i)) for i in range(a.ws_h2)]
        for fn, args in specs:
            th = threading.Thread(target=fn, args=args, daemon=True, name=fn.__name__)
            th.start()
            threads.append(th)
        sampler = Sampler(moat, stats, out / "soak.csv")
        sampler.start()

        end = T0 + a.minutes * 60
        next_reload = T0 + a.reload_every / 2
        next_restart = T0 + a.first_restart
        while not stop_ev.is_set() and now() < end:
            if not moat.alive():
                summary.append(f"MOAT DIED: exit {moat.proc.returncode}")
                rc = 1
                break
            t = now()
            if t >= next_restart and t + 20 < end:
                with stats.lock:
                    stats.windows.append([now(), None])
                app.stop()
                exited = now()
                stop_ev.wait(a.app_away)
                app.launch()
                healthy = app.wait_healthy(60)
                with stats.lock:
                    stats.windows[-1][1] = now()
                w = stats.windows[-1]
                stops.append((exited - w[0], w[1] - exited))
                print(f"soak: app restart {len(stats.windows)}: graceful stop "
                      f"{exited - w[0]:.1f}s, then away {w[1] - exited:.1f}s"
                      f"{'' if healthy else ' (NOT HEALTHY)'}", flush=True)
                if not healthy:
                    summary.append("the app did not come back after a restart")
                    rc = 1
                    break
                next_restart += a.restart_every
            elif t >= next_reload:
                moat.reload()
                with stats.lock:
                    stats.reloads.append(now())
                next_reload += a.reload_every
            stop_ev.wait(0.2)
        run_end = now()
    except Exception as e:
        traceback.print_exc()
        summary.append(f"ERROR: {e!r}")
        rc = 1
        run_end = now()
    finally:
        stop_ev.set()
        for th in threads:
            th.join(45)
        stuck = [th.name for th in threads if th.is_alive()]
        if sampler is not None:
            sampler.halt.set()
            sampler.join(15)
            if moat.alive():
                sampler.take()
        end_idle = None
        if moat.alive() and not interrupted and rc == 0:
            end_idle = idle_sample(moat, 10.0)
        moat_rc = moat.stop()
        app.stop()

    rows = sampler.rows if sampler is not None else []
    ok, fr, fo, _ = stats.totals()
    dur = run_end - T0
    summary.insert(0, f"duration: {dur / 60:.1f} min ({dur:.0f} s); {len(stats.reloads)} "
                      f"reloads (SIGHUP), {len(stats.windows)} app restarts")
    reloaded = tail(moat.stderr, 1 << 24).count("reload: now serving")
    summary.append(f"moat logged 'reload: now serving' {reloaded} times; exit code at the "
                   f"end {moat_rc}")
    if stops:
        summary.append(f"per app restart: uvicorn's graceful stop took "
                       f"{min(x for x, _ in stops):.1f}-{max(x for x, _ in stops):.1f} s, then "
                       f"the app was away {min(y for _, y in stops):.1f}-"
                       f"{max(y for _, y in stops):.1f} s until /health answered "
                       f"(upstream_wait={UPSTREAM_WAIT}s)")
    summary.append(f"requests ok: {ok}  ({', '.join(f'{k} {v}' for k, v in sorted(stats.ok.items()))})")
    summary.append(f"failures during app restarts: {fr}  "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(stats.fail_restart.items())) or '-'})")
    summary.append(f"failures outside app restarts: {fo}  "
                   f"({', '.join(f'{k} {v}' for k, v in sorted(stats.fail_outside.items())) or '-'})")
    summary.append(f"websockets open: max {stats.ws_max} at once; connects ok "
                   f"{stats.ok['ws-connect']}")
    if fo:
        rc = 1
    if stuck:
        summary.append(f"threads still running at the end: {stuck}")
    if rows:
        for col, name, unit, frac, floor, slack in ((4, "RSS", " KiB", 0.01, 64, 1024),
                                                    (5, "fds", "", 0.0, 1, 8)):
            vals = [r[col] for r in rows]
            summary.append(f"{name}: first {vals[0]}{unit}, last {vals[-1]}{unit}, "
                           f"max {max(vals)}{unit}")
            g, _, why = growth(rows, col, frac, floor, slack)
            summary.append(f"  growth rule: {'GROWS' if g else 'ok'}: {why}")
            if g:
                rc = 1
        conns = [r[6] for r in rows]
        summary.append(f"client connections: max {max(conns)}; upstream connections: max "
                       f"{max(r[7] for r in rows)}")
    if end_idle is not None:
        ok_fds = end_idle[1] <= base_idle[1] + 2
        summary.append(f"idle before traffic: rss {base_idle[0]} KiB, fds {base_idle[1]}; "
                       f"10 s after: rss {end_idle[0]} KiB, fds {end_idle[1]}, conns "
                       f"{end_idle[2]}+{end_idle[3]} ({'ok' if ok_fds else 'FDS NOT RELEASED'})")
        if not ok_fds:
            rc = 1
    if interrupted:
        summary.append(f"interrupted by signal {interrupted[0]}")
        rc = rc or 130
    if len(rows) >= 2:
        try:
            plot(rows, stats.windows, stats.reloads, out / "soak.png")
            summary.append(f"plot: {out / 'soak.png'}")
        except Exception as e:
            summary.append(f"plot failed: {e!r}")
    summary.append(f"csv: {out / 'soak.csv'}; failures: {out / 'failures.log'}")
    summary.append(f"result: {'PASS' if rc == 0 else 'FAIL'}")
    text = "\n".join(summary)
    (out / "summary.txt").write_text(text + "\n")
    print("\n== soak summary\n" + text, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
