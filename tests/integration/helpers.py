"""Helpers for moat's integration tests: ports, processes, raw TLS HTTP/1.1, curl, memory.

Everything here talks to 127.0.0.1 only.
"""

import hashlib
import json
import os
import re
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
PYTHON = "/usr/bin/python3"

# ---------------------------------------------------------------------------------------------
# Ports

_handed_out = set()
_port_lock = threading.Lock()


def free_port():
    """A loopback TCP port nothing listens on right now. Ports are never handed out twice in
    one test session, so two fixtures started back to back cannot collide with each other;
    collisions with foreign processes are retried by the fixtures that bind them."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with _port_lock:
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free loopback port found")


def port_accepts(port, timeout=0.2):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port, timeout=10.0, proc=None):
    """Poll until 127.0.0.1:port accepts TCP. Returns False on timeout or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        if port_accepts(port):
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------
# Processes


def tail(path, limit=8000):
    try:
        data = Path(path).read_bytes()
    except OSError:
        return f"<{path}: missing>"
    text = data[-limit:].decode("utf-8", "replace")
    return ("...\n" if len(data) > limit else "") + text


def child_pids(pid):
    """Direct children of pid (nginx workers), from /proc."""
    kids = []
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
        return kids
    except OSError:
        pass
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    kids.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def proc_mem_kib(pid):
    """(VmHWM, VmRSS) of one process in KiB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                vals[k] = int(v.split()[0])
    return vals.get("VmHWM", 0), vals.get("VmRSS", 0)


def uses_asan(pid):
    """True if the process maps an ASan runtime: its RSS then says little about moat."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
    return "libasan" in maps or "libclang_rt.asan" in maps


def stop_process(proc, sig=signal.SIGTERM, timeout=10.0, extra_pids=()):
    """Signal a process we started, wait, then SIGKILL it (and listed children) if needed.
    Returns the exit code, or None if it had to be killed."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        proc.send_signal(sig)
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        for pid in extra_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.kill()
        proc.wait(5)
        return None


# ---------------------------------------------------------------------------------------------
# Deterministic bodies (the same pattern as tests/fixtures/standin.py: byte i is i % 256)

_BLOCK = bytes(range(256)) * 256


def pattern_sha256(size):
    h = hashlib.sha256()
    left = size
    while left > 0:
        n = min(left, len(_BLOCK))
        h.update(_BLOCK[:n])
        left -= n
    return h.hexdigest()


def write_random_file(path, size):
    """A file of random bytes (one random MiB repeated); returns its sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            h.update(block[:n])
            left -= n
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Clients


def curl(*args, timeout=60, check=False):
    """Run curl (no proxy from the environment); returns CompletedProcess with text output."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    cp = subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout, env=env)
    cp.stdout_text = cp.stdout.decode("utf-8", "replace")
    cp.stderr_text = cp.stderr.decode("utf-8", "replace")
    if check and cp.returncode != 0:
        raise AssertionError(f"curl {args} failed rc={cp.returncode}: {cp.stderr_text}")
    return cp


def resolve_args(*ports):
    return [a for p in ports for a in ("--resolve", f"localhost:{p}:127.0.0.1")]


def tls_context(cafile):
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class RawResponse:
    def __init__(self, status, reason, headers, body, raw):
        self.status = status
        self.reason = reason
        self.headers = headers  # list of (lower-case name, value)
        self.body = body
        self.raw = raw

    def header(self, name, default=None):
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<RawResponse {self.status} {self.reason!r} {self.raw[:300]!r}>"


def read_response(sock, timeout=10.0):
    """Read one HTTP/1.1 response: body by Content-Length, chunked, or until EOF."""
    sock.settimeout(timeout)
    buf = b""

    def more():
        nonlocal buf
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            data = b""
        buf += data
        return bool(data)

    while b"\r\n\r\n" not in buf:
        if not more():
            raise ConnectionError(f"connection closed before a full response head: {buf!r}")
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    m = re.match(r"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
    if not m:
        raise ValueError(f"bad status line {lines[0]!r}")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.append((k.strip().lower(), v.strip()))
    hd = dict(headers)
    buf = rest
    if "content-length" in hd:
        n = int(hd["content-length"])
        while len(buf) < n and more():
            pass
        body = buf[:n]
    elif "chunked" in hd.get("transfer-encoding", "").lower():
        body = b""
        while True:
            while b"\r\n" not in buf:
                if not more():
                    raise ConnectionError("eof inside chunked body")
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                if not more():
                    raise ConnectionError("eof inside chunk")
            body += buf[:size]
            buf = buf[size + 2:]
            if size == 0:
                break
    else:
        while more():
            pass
        body = buf
    return RawResponse(int(m.group(1)), m.group(2), headers, body, head + b"\r\n\r\n" + body)


def raw_https(port, cafile, data, timeout=10.0, send_chunk=16384):
    """Send `data` verbatim over a verified TLS connection to localhost:port and read one
    response. A server may answer and close before it has read everything (e.g. 431), so
    send errors are swallowed and the response is still read."""
    ctx = tls_context(cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as tcp:
        with ctx.wrap_socket(tcp, server_hostname="localhost") as s:
            try:
                for i in range(0, len(data), send_chunk):
                    s.sendall(data[i:i + send_chunk])
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
            return read_response(s, timeout)


# ---------------------------------------------------------------------------------------------
# A raw upstream with no header size limit. uvicorn's parsers cap request heads (httptools
# at 80 KiB, h11 at 16 KiB), so a test that a proxy *accepts* a 100 KiB cookie needs a peer
# that does too.


class _BigHeadHandler(socketserver.BaseRequestHandler):
    def handle(self):
        sock = self.request
        sock.settimeout(10)
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    return
                buf += data
                if len(buf) > (4 << 20):
                    return
            head, buf = buf.split(b"\r\n\r\n", 1)
            lines = head.split(b"\r\n")
            self.server.heads.append(head)
            body = json.dumps({"request_line": lines[0].decode("latin-1"),
                               "head_bytes": len(head),
                               "headers": len(lines) - 1}).encode()
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                         b"X-Standin: bighead\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)


class BigHeadUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.heads = []
        super().__init__(("127.0.0.1", 0), _BigHeadHandler)
        self.port = self.server_address[1]
        self.addr = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.shutdown()
        self.server_close()
