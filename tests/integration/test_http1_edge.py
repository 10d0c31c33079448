"""HTTP/1.1 edge behaviours a careful client or an attacker meets (RFC 9112): keep-alive for
HTTP/1.0, a request line without a version, an h2c upgrade on an ordinary request, TRACE.
Each runs against moat, and against nginx with MOAT_TEST_TARGET=nginx."""
import json
import socket
import ssl
import time

from helpers import read_response, tls_context


def tls_conn(p):
    tcp = socket.create_connection(("127.0.0.1", p.https_port), timeout=10)
    return tls_context(p.ca).wrap_socket(tcp, server_hostname="localhost")


def test_http10_keep_alive_is_signalled_and_kept(moat, upstream):
    """RFC 9112 §9.3: a 1.0 client that asks for keep-alive must be told it got it, or the
    connection must close; moat answers with Connection: keep-alive and keeps it."""
    p = moat(upstream.addr)
    req = b"GET /health HTTP/1.0\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n"
    with tls_conn(p) as s:
        s.sendall(req)
        first = read_response(s)
        assert first.status == 200
        assert (first.header("connection") or "").lower() == "keep-alive", first.raw
        s.sendall(req)
        second = read_response(s)
        assert second.status == 200


def test_http10_without_keep_alive_is_closed(moat, upstream):
    p = moat(upstream.addr)
    with tls_conn(p) as s:
        s.sendall(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        r = read_response(s)
        assert r.status == 200
        s.settimeout(5)
        try:
            rest = s.recv(100)
        except (ConnectionResetError, ssl.SSLError):
            rest = b""
        assert rest == b""  # closed by moat, not held open


def http09_answer(port, tls_ca=None):
    """Send an HTTP/0.9 request line and return (bytes received, seconds until the
    connection ended or 10 s passed)."""
    tcp = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = tls_context(tls_ca).wrap_socket(tcp, server_hostname="localhost") if tls_ca else tcp
    t0 = time.monotonic()
    data = b""
    with s:
        s.sendall(b"GET /\r\n")
        s.settimeout(10)
        try:
            while time.monotonic() - t0 < 10:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (socket.timeout, ConnectionResetError, ssl.SSLError):
            pass
    return data, time.monotonic() - t0


def test_http09_request_line_gets_400_at_once(moat, upstream):
    p = moat(upstream.addr)
    for port, ca in ((p.https_port, p.ca), (p.http_port, None)):
        data, took = http09_answer(port, ca)
        assert data.startswith(b"HTTP/1.1 400"), (port, data[:200])
        assert took < 5, (port, took)  # not held until the header timeout (30 s)


def echo_headers(resp):
    return [(k.lower(), v) for k, v in json.loads(resp.body)["headers"]]


def test_h2c_upgrade_is_never_forwarded(moat, upstream):
    """An h2c upgrade would let a client speak HTTP/2 to the app past the proxy's checks."""
    p = moat(upstream.addr)
    with tls_conn(p) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings"
                  b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        r = read_response(s)
    assert r.status == 200, r.raw
    seen = echo_headers(r)
    names = [k for k, _ in seen]
    assert "upgrade" not in names, seen
    assert "http2-settings" not in names, seen
    assert ("connection", "upgrade") not in [(k, v.lower()) for k, v in seen], seen


def test_websocket_upgrade_still_passes(moat, upstream):
    p = moat(upstream.addr)
    with tls_conn(p) as s:
        s.sendall(b"GET /ws/echo HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        s.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, head
            head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:200]


def test_trace_is_refused_and_not_forwarded(moat, upstream):
    p = moat(upstream.addr)
    with tls_conn(p) as s:
        s.sendall(b"TRACE / HTTP/1.1\r\nHost: localhost\r\nMax-Forwards: 0\r\n"
                  b"Cookie: secret=1\r\n\r\n")
        r = read_response(s)
    assert r.status == 405, r.raw
    assert b"secret" not in r.body
    if p.kind == "moat":
        deadline = time.monotonic() + 5
        entries = []
        while time.monotonic() < deadline:
            entries = [e for e in p.access_entries() if e.get("method") == "TRACE"]
            if entries:
                break
            time.sleep(0.05)
        assert entries and entries[-1]["status"] == 405, entries
        assert not entries[-1].get("upstream"), entries  # answered by moat itself
