"""The proxy through the real binary: HTTPS, the redirect, uploads, keep-alive, the 502 page,
reloads and stops, malformed requests and forwarded headers — driven with curl, httpx and raw TLS.

Each test starts its own proxy on fresh loopback ports in front of the stand-in Open WebUI
(tests/fixtures/standin.py). MOAT_TEST_TARGET=nginx runs the proxy tests against nginx.
"""

import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid

import pytest

from conftest import MOAT_BIN, require_moat
from helpers import (BigHeadUpstream, curl, free_port, pattern_sha256, port_accepts,
                     raw_https, uses_asan, write_random_file)

RSS_LIMIT_MB = float(os.environ.get("MOAT_TEST_RSS_LIMIT_MB", "40"))
RSS_GROWTH_MB = float(os.environ.get("MOAT_TEST_RSS_GROWTH_MB", "30"))


def _json_stream(text):
    """Parse concatenated JSON documents (curl prints one body per URL, back to back)."""
    dec = json.JSONDecoder()
    out, i = [], 0
    text = text.strip()
    while i < len(text):
        obj, j = dec.raw_decode(text, i)
        out.append(obj)
        i = j
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def _headers(echo):
    """Echoed request headers as {lower-name: [values]}."""
    d = {}
    for k, v in echo["headers"]:
        d.setdefault(k.lower(), []).append(v)
    return d


class SlowDownload(threading.Thread):
    """GET /slow through the proxy in the background; records status, X-Standin, size and
    sha256 of the body, and sets `started` once the first body bytes have arrived."""

    def __init__(self, proxy, seconds, size):
        super().__init__(daemon=True)
        self.proxy, self.seconds, self.size = proxy, seconds, size
        self.started = threading.Event()
        self.result = {}

    def run(self):
        try:
            with self.proxy.client(timeout=self.seconds + 20) as c:
                url = self.proxy.url(f"/slow?seconds={self.seconds}&size={self.size}")
                with c.stream("GET", url) as r:
                    self.result["status"] = r.status_code
                    self.result["standin"] = r.headers.get("x-standin")
                    h, n = hashlib.sha256(), 0
                    for chunk in r.iter_raw():
                        self.started.set()
                        h.update(chunk)
                        n += len(chunk)
                    self.result["n"], self.result["sha"] = n, h.hexdigest()
        except Exception as e:  # reported by the test through self.result
            self.result["error"] = repr(e)
        finally:
            self.started.set()

    def check(self, standin=None):
        r = self.result
        assert "error" not in r, f"slow download failed: {r['error']}"
        assert r.get("status") == 200, r
        if standin:
            assert r.get("standin") == standin, r
        assert r.get("n") == self.size, f"body truncated: {r.get('n')} of {self.size} bytes"
        assert r.get("sha") == pattern_sha256(self.size), "body corrupted"


# 1 -------------------------------------------------------------------------------------------
def test_https_verified_by_curl_with_ca_root(proxy, upstream):
    p = proxy(upstream.addr)
    cp = curl(*p.curl_args(), "-o", "-", "-w", "\n%{http_code} %{ssl_verify_result}",
              p.url("/health"))
    assert cp.returncode == 0, cp.stderr_text
    body, _, tail = cp.stdout_text.rpartition("\n")
    assert tail == "200 0", cp.stdout_text
    assert json.loads(body)["status"] is True
    # And the certificate really is what verified it: without the CA bundle curl refuses.
    cp = curl(*p.curl_args()[2:], "-o", "/dev/null", p.url("/health"))
    assert cp.returncode == 60, f"expected an unverifiable certificate: {cp.stderr_text}"


# 2 -------------------------------------------------------------------------------------------
def test_http_port_redirects_with_308(proxy, upstream):
    p = proxy(upstream.addr)
    cp = curl(*p.curl_args(), "-o", "/dev/null", "-D", "-", p.http_url("/a/b?x=1"))
    assert cp.returncode == 0, cp.stderr_text
    head = cp.stdout_text
    assert re.match(r"HTTP/1\.[01] 308", head), head
    loc = re.search(r"(?im)^location:\s*(\S+)", head)
    assert loc and loc.group(1) == f"https://localhost:{p.https_port}/a/b?x=1", head


# 3 -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_50mb_upload_intact_and_memory_bounded(proxy, upstream, tmp_path):
    p = proxy(upstream.addr)
    size = 50 << 20
    f = tmp_path / "upload.bin"
    sha = write_random_file(f, size)
    curl(*p.curl_args(), "-o", "/dev/null", p.url("/health"), check=True)  # warm-up
    hwm0, rss0 = p.mem_kib()
    # -T streams the file from disk (and sends Expect: 100-continue); -X POST keeps it a POST.
    cp = curl(*p.curl_args(), "-X", "POST", "-T", str(f), "-H",
              "Content-Type: application/octet-stream", p.url("/echo"), timeout=120)
    assert cp.returncode == 0, cp.stderr_text
    echo = json.loads(cp.stdout_text)
    assert echo["body_len"] == size
    assert echo["body_sha256"] == sha
    hwm1, rss1 = p.mem_kib()
    growth = (hwm1 - hwm0) / 1024
    print(f"{p.kind} memory: VmHWM {hwm0 // 1024} -> {hwm1 // 1024} MiB, "
          f"VmRSS {rss0 // 1024} -> {rss1 // 1024} MiB")
    if uses_asan(p.pid):
        # ASan's quarantine keeps freed blocks resident (256 MiB by default), so RSS measures
        # the sanitizer, not moat. Bodies were still checked above.
        print("ASan build: memory bounds not asserted")
        return
    assert growth < RSS_GROWTH_MB, f"peak RSS grew by {growth:.1f} MiB for a {size >> 20} MiB body"
    assert hwm1 / 1024 < RSS_LIMIT_MB, f"peak RSS {hwm1 / 1024:.1f} MiB"


# 4 -------------------------------------------------------------------------------------------
def test_chunked_upload_intact(proxy, upstream, tmp_path):
    p = proxy(upstream.addr)
    size = (4 << 20) + 12345
    f = tmp_path / "chunked.bin"
    sha = write_random_file(f, size)
    cp = curl(*p.curl_args(), "-H", "Transfer-Encoding: chunked", "-H",
              "Content-Type: application/octet-stream", "--data-binary", f"@{f}", p.url("/echo"))
    assert cp.returncode == 0, cp.stderr_text
    echo = json.loads(cp.stdout_text)
    assert (echo["body_len"], echo["body_sha256"]) == (size, sha)


def test_multipart_file_upload_intact(proxy, upstream, tmp_path):
    p = proxy(upstream.addr)
    size = 10 << 20
    f = tmp_path / "doc.pdf"
    sha = write_random_file(f, size)
    cp = curl(*p.curl_args(), "-F", f"file=@{f}", p.url("/api/v1/files/"))
    assert cp.returncode == 0, cp.stderr_text
    res = json.loads(cp.stdout_text)
    assert (res["filename"], res["size"], res["sha256"]) == ("doc.pdf", size, sha)


# 5 -------------------------------------------------------------------------------------------
def test_keepalive_reuses_client_and_upstream_connections(proxy, upstream):
    p = proxy(upstream.addr)
    n = 6
    urls = [p.url(f"/echo?i={i}") for i in range(n)]
    cp = curl(*p.curl_args(), "-v", *urls)
    assert cp.returncode == 0, cp.stderr_text
    reused = len(re.findall(r"Re-?using existing connection", cp.stderr_text))
    assert reused == n - 1, f"curl reused the connection {reused} times of {n - 1}"
    echoes = _json_stream(cp.stdout_text)
    assert [e["query"] for e in echoes] == [f"i={i}" for i in range(n)]
    # The stand-in reports each request's TCP peer: fewer distinct peers than requests means
    # the proxy kept its upstream connections alive too.
    peers = {tuple(e["peer"]) for e in echoes}
    assert len(peers) < n, f"upstream saw a new connection per request: {sorted(peers)}"

    # Same with httpx, a pooled client.
    with p.client() as c:
        echoes = [c.get(p.url(f"/echo?j={i}")).json() for i in range(n)]
    assert len({tuple(e["peer"]) for e in echoes}) < n


# 6 -------------------------------------------------------------------------------------------
def test_502_with_html_body_when_upstream_down(proxy):
    # Nothing listens there. upstream_wait (moat waits that long for the app before its 502,
    # 10 s by default) kept short: this test is about the answer, test_app_restart.py about
    # the wait.
    p = proxy(f"127.0.0.1:{free_port()}", moat_opts=["upstream_wait=300ms"])
    with p.client() as c:
        for _ in range(2):  # twice: the first failure must not break the proxy
            r = c.get(p.url("/health"))
            assert r.status_code == 502
            assert r.headers.get("content-type", "").startswith("text/html"), r.headers
            text = re.sub(r"<[^>]*>", " ", r.text)
            assert re.search(r"<html|<!doctype", r.text, re.I), r.text
            assert re.search(r"[A-Za-z]{3,}", text), f"no readable text: {r.text!r}"
    assert p.alive()


# 7 -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sighup_switches_upstream_without_cutting_requests(proxy, upstream_factory):
    a, b = upstream_factory("A"), upstream_factory("B")
    p = proxy(a.addr)
    with p.client() as c:
        assert c.get(p.url("/health")).headers.get("x-standin") == "A"
    dl = SlowDownload(p, seconds=3, size=256 * 1024)
    dl.start()
    assert dl.started.wait(5), "slow download never started"
    p.set_upstream(b.addr)
    p.reload()
    seen, deadline = None, time.monotonic() + 5
    while time.monotonic() < deadline:
        with p.client() as c:  # a fresh connection each time
            seen = c.get(p.url("/health")).headers.get("x-standin")
        if seen == "B":
            break
        time.sleep(0.1)
    assert seen == "B", "new requests still reach A 5 s after SIGHUP"
    assert dl.is_alive(), "the slow download ended before the reload was observed"
    dl.join(20)
    dl.check(standin="A")
    assert p.alive(), "the proxy exited on SIGHUP"


# 8 -------------------------------------------------------------------------------------------
def _texts(raw):
    """Raw output plus every string inside JSON log lines (messages may be JSON-escaped)."""
    out = [raw]
    for line in raw.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out += [v for v in obj.values() if isinstance(v, str)]
    return out


def _find_error(raw, path, line):
    pat = re.compile(re.escape(str(path)) + rf":{line}:(\d+): ?([^\n]*)")
    for t in _texts(raw):
        m = pat.search(t)
        if m:
            return int(m.group(1)), m.group(2)
    return None


@pytest.mark.moat_only
def test_bad_site_line_exits_1_fast_without_binding(tmp_path):
    require_moat()
    cfg = tmp_path / "bad"
    line = "localhost 127.0.0.1:9 bogus_option=1"
    col = line.index("bogus_option") + 1
    cfg.write_text(line + "\n")
    hp, sp = free_port(), free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen([MOAT_BIN, "run", "--config", str(cfg), "--data",
                             str(tmp_path / "data"), "--http-port", str(hp), "--https-port",
                             str(sp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    bound = False
    while proc.poll() is None and time.monotonic() - t0 < 3:
        bound = bound or port_accepts(hp, 0.05) or port_accepts(sp, 0.05)
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=5)
    raw = (out + err).decode("utf-8", "replace")
    assert proc.returncode == 1, f"exit {proc.returncode} after {elapsed:.1f}s:\n{raw}"
    assert elapsed < 2, f"took {elapsed:.1f}s to reject the file"
    assert not bound, "moat accepted connections with a bad site file"
    found = _find_error(raw, cfg, 1)
    assert found, f"no '{cfg}:1:COL: message' in:\n{raw}"
    got_col, msg = found
    assert col <= got_col <= len(line), f"column {got_col} does not point at 'bogus_option'"
    assert "bogus_option" in msg, f"message does not name the option: {msg!r}"


@pytest.mark.moat_only
def test_validate_exit_codes(tmp_path):
    require_moat()

    def validate(text):
        cfg = tmp_path / f"Moatfile{len(text)}"
        cfg.write_text(text)
        cp = subprocess.run([MOAT_BIN, "validate", "--config", str(cfg)], capture_output=True,
                            timeout=10)
        return cfg, cp.returncode, (cp.stdout + cp.stderr).decode("utf-8", "replace")

    cfg, rc, out = validate("# a comment\nlocalhost 127.0.0.1:8080\n")
    assert rc == 0, out
    assert out.strip(), "validate printed no summary"

    cfg, rc, out = validate("localhost 127.0.0.1:8080\nexample.test 127.0.0.1:8080 nope=1\n")
    assert rc == 1, out
    found = _find_error(out, cfg, 2)
    assert found and "nope" in found[1], out

    cfg, rc, out = validate("localhost\n")  # no upstream
    assert rc == 1, out
    assert _find_error(out, cfg, 1), out


# 9 -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_lets_inflight_request_finish_then_exits_0(proxy, upstream):
    p = proxy(upstream.addr)
    dl = SlowDownload(p, seconds=2, size=128 * 1024)
    dl.start()
    assert dl.started.wait(5), "slow download never started"
    p.send_signal(signal.SIGTERM)
    dl.join(20)
    try:
        rc = p.proc.wait(15)
    except subprocess.TimeoutExpired:
        rc = "still running 15 s after SIGTERM"
    p.exit_code = rc
    dl.check()
    assert rc == 0


# 10 ------------------------------------------------------------------------------------------
def test_malformed_requests_rejected_before_upstream(proxy):
    peer = BigHeadUpstream()  # records every request head it receives; no header size limit
    try:
        p = proxy(peer.addr)
        host = f"localhost:{p.https_port}"
        mark = uuid.uuid4().hex

        # Content-Length with Transfer-Encoding: the classic smuggling shape.
        req = (f"POST /echo?m=clte-{mark} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 60\r\n"
               f"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
               f"GET /echo?m=smuggled-{mark} HTTP/1.1\r\nHost: {host}\r\n\r\n")
        r = raw_https(p.https_port, p.ca, req.encode())
        assert r.status == 400, r

        # Obsolete line folding (RFC 9112 5.2: reject or unfold; moat rejects).
        req = (f"GET /echo?m=fold-{mark} HTTP/1.1\r\nHost: {host}\r\nX-Folded: a\r\n b\r\n"
               f"Connection: close\r\n\r\n")
        r = raw_https(p.https_port, p.ca, req.encode())
        assert r.status == 400, r

        # A 100 KiB cookie is big but legitimate.
        cookie = "session=" + "c" * (100 * 1024)
        req = (f"GET /echo?m=cookie-{mark} HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n"
               f"Connection: close\r\n\r\n")
        r = raw_https(p.https_port, p.ca, req.encode())
        assert r.status == 200, r
        assert r.json()["head_bytes"] > 100 * 1024

        # 200 KiB of header fields is too much.
        big = "".join(f"X-Big-{i}: {'b' * 10240}\r\n" for i in range(20))
        req = f"GET /echo?m=big-{mark} HTTP/1.1\r\nHost: {host}\r\n{big}Connection: close\r\n\r\n"
        r = raw_https(p.https_port, p.ca, req.encode())
        assert r.status == 431, r

        time.sleep(0.2)
        seen = [h.split(b"\r\n", 1)[0].decode("latin-1") for h in peer.heads]
        for bad in ("clte", "smuggled", "fold", "big"):
            assert not any(f"{bad}-{mark}" in s for s in seen), \
                f"upstream received the rejected {bad} request: {seen}"
        assert any(f"cookie-{mark}" in s for s in seen)
    finally:
        peer.close()


# 11 ------------------------------------------------------------------------------------------
def test_forwarded_and_hop_by_hop_headers(proxy, upstream):
    p = proxy(upstream.addr)
    host = f"localhost:{p.https_port}"
    req = (f"GET /echo?h=1 HTTP/1.1\r\nHost: {host}\r\nConnection: foo\r\nFoo: x\r\n"
           f"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Custom: kept\r\n\r\n")
    r = raw_https(p.https_port, p.ca, req.encode())
    assert r.status == 200, r
    h = _headers(r.json())
    assert h.get("host") == [host]
    assert h.get("x-forwarded-proto") == ["https"]
    assert "127.0.0.1" in ",".join(h.get("x-forwarded-for", [])), h
    assert h.get("x-forwarded-host") == [host]
    assert h.get("x-custom") == ["kept"]  # so the absences below mean something
    for gone in ("foo", "keep-alive", "proxy-connection"):
        assert gone not in h, f"hop-by-hop header {gone!r} reached the upstream: {h[gone]}"
    assert "foo" not in ",".join(h.get("connection", [])).lower(), h.get("connection")


def test_app_redirect_keeps_https_and_port(proxy, upstream):
    # FastAPI's redirect_slashes builds Location from Host and X-Forwarded-Proto: the user
    # must land back on the proxy, not on http:// or the upstream's port.
    p = proxy(upstream.addr)
    with p.client(follow_redirects=False) as c:
        r = c.get(p.url("/api/v1/files"))
    assert r.status_code == 307
    assert r.headers["location"] == f"https://localhost:{p.https_port}/api/v1/files/"
