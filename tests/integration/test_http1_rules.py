"""moat's HTTP/1.1 edge policy in one table (RFC 9112 message rules).

Each row is one raw request sent over TLS: what the client gets back, and what reaches the
app (nothing at all, or a request with the named property). A recording upstream keeps every
request it receives, head and body, keyed by a marker in the path, so "never reaches the app"
is checked, not assumed. The same table runs against nginx with MOAT_TEST_TARGET=nginx; the
last column says where nginx (1.22, the typical Open WebUI configuration in conftest.py)
answers differently, as measured: it fails 6 rows, each one where moat is stricter.
Where moat streams a body (chunked), a bad chunk cuts the upstream request: the app may see
its start, then the connection end, never a complete request.

Response-side rows use paths the recording upstream answers in a scripted way (1xx before
the final response; HEAD, 204 and 304 without a body).
"""
import socket
import socketserver
import ssl
import threading
import uuid

import pytest

import conftest as base
from helpers import tls_context

NEVER = "never reaches the app"


class _Handler(socketserver.BaseRequestHandler):
    """Reads requests (Content-Length or chunked bodies), records them, answers by path."""

    def handle(self):
        sock = self.request
        sock.settimeout(10)
        buf = b""

        def more():
            nonlocal buf
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buf += data

        try:
            for _ in range(100):  # requests on one connection
                while b"\r\n\r\n" not in buf:
                    more()
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.split(b"\r\n")
                fields = {}
                for ln in lines[1:]:
                    k, _, v = ln.partition(b":")
                    fields.setdefault(k.strip().lower().decode("latin-1"), []).append(
                        v.strip().decode("latin-1"))
                body = b""
                if "chunked" in ",".join(fields.get("transfer-encoding", [])):
                    for _ in range(100000):  # chunks
                        while b"\r\n" not in buf:
                            more()
                        size_line, buf = buf.split(b"\r\n", 1)
                        size = int(size_line.split(b";")[0], 16)
                        if size == 0:  # trailer fields, if any, then an empty line
                            for _ in range(100):
                                while b"\r\n" not in buf:
                                    more()
                                line, buf = buf.split(b"\r\n", 1)
                                if not line:
                                    break
                            break
                        while len(buf) < size + 2:
                            more()
                        body += buf[:size]
                        buf = buf[size + 2:]
                elif "content-length" in fields:
                    n = int(fields["content-length"][0])
                    while len(buf) < n:
                        more()
                    body, buf = buf[:n], buf[n:]
                line = lines[0].decode("latin-1")
                self.server.seen.append({"line": line, "fields": fields, "body": body})
                sock.sendall(self.answer(line))
        except (ConnectionError, OSError, ValueError):
            return

    @staticmethod
    def answer(line):
        method, target = line.split(" ")[0], line.split(" ")[1] if " " in line else "/"
        if "/r/103" in target:
            return (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if "/r/204" in target:
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if "/r/304" in target:
            return b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n"
        body = b"" if method == "HEAD" else b"ok"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n" + body


class RecordingUpstream(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        self.seen = []
        super().__init__(("127.0.0.1", 0), _Handler)
        self.addr = f"127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def find(self, mark):
        return [r for r in self.seen if mark in r["line"] or
                any(mark in v for vs in r["fields"].values() for v in vs)]


# (id, request with {m} for a unique marker and {h} for the Host, expected status(es),
#  what reaches the app: NEVER, or a function of the recorded request that must hold,
#  how nginx differs (None: the same)).
def body_is(b):
    return lambda r: r["body"] == b


def field(name, value=None):
    return lambda r: name in r["fields"] and (value is None or r["fields"][name] == [value])


def no_field(name):
    return lambda r: name not in r["fields"]


def line_is(text):
    return lambda r: r["line"].startswith(text)


ROWS = [
    # request line
    ("origin-form", "GET /{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 200, line_is("GET /"), None),
    ("absolute-form: origin-form upstream, its authority wins over Host",
     "GET https://{h}/{m} HTTP/1.1\r\nHost: other.invalid\r\n\r\n", 200, line_is("GET /"),
     None),
    ("two spaces in the request line", "GET  /{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 400, NEVER,
     "nginx: 200, forwarded"),
    ("tab instead of space", "GET\t/{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 400, NEVER, None),
    ("HTTP/2.0 on an HTTP/1.1 connection", "GET /{m} HTTP/2.0\r\nHost: {h}\r\n\r\n", 505,
     NEVER, None),
    ("unknown method token passes", "PURGE /{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 200,
     line_is("PURGE /"), None),
    ("lower-case method (a probe: refused, as nginx does)", "get /{m} HTTP/1.1\r\nHost: {h}\r\n\r\n",
     400, NEVER, None),
    ("method with a bad byte", "GE(T /{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 400, NEVER, None),
    ("target with a raw space byte", "GET /{m} x HTTP/1.1\r\nHost: {h}\r\n\r\n", 400, NEVER,
     None),
    ("URI over the limit", "GET /{m}" + "a" * 70000 + " HTTP/1.1\r\nHost: {h}\r\n\r\n",
     (414, 400), NEVER, "nginx: 200 with large_client_header_buffers 128k"),
    # fields
    ("whitespace before the colon", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX-A : 1\r\n\r\n", 400,
     NEVER, None),
    ("obs-fold", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX-A: 1\r\n 2\r\n\r\n", 400, NEVER, None),
    ("field name with a bad byte", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX(A): 1\r\n\r\n", 400,
     NEVER, "nginx: 200 (ignore_invalid_headers drops the field)"),
    ("bare CR in a value", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX-A: 1\r2\r\n\r\n", 400, NEVER,
     None),
    ("NUL in a value", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX-A: 1\x002\r\n\r\n", 400, NEVER,
     None),
    ("no Host in HTTP/1.1", "GET /{m} HTTP/1.1\r\nX-A: 1\r\n\r\n", 400, NEVER, None),
    ("two Host fields", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nHost: {h}\r\n\r\n", 400, NEVER,
     None),
    ("Host that is not a host", "GET /{m} HTTP/1.1\r\nHost: a/b\r\n\r\n", 400, NEVER,
     None),
    ("HTTP/1.0 without Host", "GET /{m} HTTP/1.0\r\n\r\n", 400, NEVER,
     "nginx: 200 from the default server"),
    ("hop-by-hop fields named in Connection are dropped",
     "GET /{m} HTTP/1.1\r\nHost: {h}\r\nConnection: x-secret\r\nX-Secret: 1\r\n"
     "Keep-Alive: 5\r\nProxy-Connection: keep-alive\r\n\r\n", 200,
     lambda r: "x-secret" not in r["fields"] and "keep-alive" not in r["fields"] and
     "proxy-connection" not in r["fields"], "nginx: forwards X-Secret and Proxy-Connection"),
    # bodies
    ("Content-Length body", "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\n\r\nhello",
     200, body_is(b"hello"), None),
    ("chunked body with a chunk extension",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n"
     "5;ext=1\r\nhello\r\n0\r\n\r\n", 200, body_is(b"hello"), None),
    ("chunked body with trailer fields (dropped)",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n"
     "5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n", 200, body_is(b"hello"), None),
    ("chunk size not hex",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
     400, NEVER, None),
    ("Content-Length list of equal values",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5, 5\r\n\r\nhello", 400, NEVER,
     "RFC 9112 allows accepting it; refused as nginx does"),
    ("two different Content-Length fields",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
     400, NEVER, None),
    ("Content-Length with a sign", "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: +5\r\n\r\nhello",
     400, NEVER, None),
    ("Content-Length and Transfer-Encoding",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     "5\r\nhello\r\n0\r\n\r\n", 400, NEVER, None),
    ("Transfer-Encoding other than chunked",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: gzip\r\n\r\nhello", (400, 501),
     NEVER, None),
    ("chunked not last", "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"
     "5\r\nhello\r\n0\r\n\r\n", (400, 501), NEVER, None),
    # expectations
    ("Expect: 100-continue", "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\n"
     "Expect: 100-continue\r\n\r\nhello", (100, 200), body_is(b"hello"), None),
    ("unknown expectation: passed on, as nginx does (RFC 9110 §10.1.1 allows 417)",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 5\r\nExpect: teapot\r\n\r\nhello", 200,
     body_is(b"hello"), None),
    # methods moat answers itself
    ("TRACE", "TRACE /{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 405, NEVER, None),
    ("CONNECT (not a forward proxy)", "CONNECT {h}:443 HTTP/1.1\r\nHost: {h}\r\n\r\n",
     (400, 405, 501), NEVER, None),
    ("h2c upgrade is not passed on",
     "GET /{m} HTTP/1.1\r\nHost: {h}\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
     "HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", 200,
     lambda r: "upgrade" not in r["fields"] and "http2-settings" not in r["fields"],
     "nginx (the usual Open WebUI config passes Upgrade on): forwards the h2c upgrade"),
    # responses
    ("1xx before the final response", "GET /r/103/{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", (103, 200),
     line_is("GET /r/103/"), None),
    ("204 has no body", "GET /r/204/{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 204, line_is("GET"),
     None),
    ("304 has no body", "GET /r/304/{m} HTTP/1.1\r\nHost: {h}\r\nIf-None-Match: \"v1\"\r\n\r\n",
     304, line_is("GET"), None),
    ("HEAD has no body", "HEAD /{m} HTTP/1.1\r\nHost: {h}\r\n\r\n", 200, line_is("HEAD"), None),
]


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """One proxy (moat, or nginx with MOAT_TEST_TARGET=nginx) before one recording app."""
    app = RecordingUpstream()
    d = tmp_path_factory.mktemp("edge")
    if base.TARGET == "nginx":
        from conftest import NginxProxy
        p = NginxProxy(d, app.addr, _module_test_ca(tmp_path_factory))
    else:
        base.require_moat()
        p = base.MoatProxy(d, app.addr)
    p.start()
    yield p, app
    p.stop()
    app.shutdown()
    app.server_close()


def _module_test_ca(tmp_path_factory):
    import subprocess
    d = tmp_path_factory.mktemp("edgeca")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem",
                    "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost"], cwd=d, check=True, capture_output=True)
    return {"ca": d / "ca.pem", "ca_key": d / "ca.key", "cert": d / "ca.pem", "key": d / "ca.key"}


class _Reader:
    """Responses from one connection, in order, keeping what follows each one."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _more(self):
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, socket.timeout):
            data = b""
        self.buf += data
        return bool(data)

    def response(self, head_request):
        """(status, body). Interim (1xx), 204, 304 and HEAD responses have no body."""
        for _ in range(1000):
            if b"\r\n\r\n" in self.buf or not self._more():
                break
        if b"\r\n\r\n" not in self.buf:
            raise ConnectionError(f"closed before a full response head: {self.buf[:200]!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        fields = dict((k.strip().lower(), v.strip()) for k, _, v in
                      (ln.partition(":") for ln in lines[1:]))
        if status < 200 or status in (204, 304) or head_request:
            extra = b""
            if status >= 200:  # a body where none may be shows up as extra bytes
                self.sock.settimeout(0.3)
                self._more()
                extra, self.buf = self.buf, b""
            return status, extra
        if "content-length" in fields:
            n = int(fields["content-length"])
            for _ in range(10000):
                if len(self.buf) >= n or not self._more():
                    break
            body, self.buf = self.buf[:n], self.buf[n:]
            return status, body
        for _ in range(10000):  # chunked or until close: the rows need only "is there one"
            if not self._more():
                break
        body, self.buf = self.buf, b""
        return status, body


def exchange(p, raw):
    """Send raw bytes; the statuses of every response up to the final one, and its body."""
    tcp = socket.create_connection(("127.0.0.1", p.https_port), timeout=10)
    with tls_context(p.ca).wrap_socket(tcp, server_hostname="localhost") as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass
        r = _Reader(s)
        statuses, body = [], b""
        for _ in range(5):  # interim responses, then the final one
            status, body = r.response(raw.startswith(b"HEAD"))
            statuses.append(status)
            if status >= 200:
                break
        return statuses, body


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_rule(edge, row):
    p, app = edge
    name, template, want, upstream_check, nginx_note = row
    mark = "m" + uuid.uuid4().hex[:12]
    raw = template.replace("{m}", mark).replace("{h}", "localhost").encode("latin-1")
    try:
        statuses, body = exchange(p, raw)
    except (ConnectionError, OSError, ValueError) as e:
        statuses, body = [f"no response: {e}"], b""
    wants = want if isinstance(want, tuple) else (want,)
    final = statuses[-1]
    if base.TARGET == "nginx" and nginx_note:
        print(f"\n{name}: nginx got {statuses} (table: {want}; {nginx_note})")
    if wants in ((100, 200), (103, 200)):  # the interim answer may or may not be passed on
        assert final == 200 and all(st in wants for st in statuses), f"{name}: got {statuses}"
    else:
        assert final in wants, f"{name}: got {statuses}, want {want}"
    if final in (204, 304) or raw.startswith(b"HEAD"):
        assert body == b"", f"{name}: a body came with {final}"
    seen = app.find(mark)
    if upstream_check == NEVER:
        assert not seen, f"{name}: reached the app as {seen}"
    elif upstream_check is not None:
        assert seen, f"{name}: never reached the app"
        assert upstream_check(seen[-1]), f"{name}: the app got {seen[-1]}"
