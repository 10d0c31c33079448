"""Differential check: the same raw request bytes to moat and to nginx, each in front of its own
recording app, and what each app receives compared.

For every row of the HTTP/1.1 table (test_http1_rules.py) and a set of inputs of the kind the
fuzzer finds interesting (tests/fuzz/seeds/http1 when it exists, plus the list below), each
request ends in one of four ways:
- both refuse it, or moat refuses what nginx forwards (moat is stricter): fine, and counted;
- moat forwards what nginx refuses: a failure unless EXPLAINED says why it is right;
- both forward it: method, target, body and end-to-end fields must match, apart from the
  differences EXPLAINED names (framing: nginx buffers a chunked body and sends a length).
nginx runs the typical Open WebUI configuration from conftest.py.
"""
import shutil
import socket
import ssl
import uuid
from pathlib import Path

import pytest

import conftest as base
from helpers import tls_context
from test_http1_rules import ROWS, RecordingUpstream

SEEDS = Path(__file__).resolve().parent.parent / "fuzz" / "seeds" / "http1"

# Inputs beyond the table: shapes parsers disagree on.
EXTRA = [
    ("header value with trailing spaces", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX-A: v   \r\n\r\n"),
    ("empty header value", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX-Empty:\r\n\r\n"),
    ("LF-only line ends", "GET /{m} HTTP/1.1\nHost: {h}\n\n"),
    ("percent-encoded target", "GET /{m}/%2e%2e/x?q=%00 HTTP/1.1\r\nHost: {h}\r\n\r\n"),
    ("fragment in the target", "GET /{m}#frag HTTP/1.1\r\nHost: {h}\r\n\r\n"),
    ("Host with the port", "GET /{m} HTTP/1.1\r\nHost: {h}:443\r\n\r\n"),
    ("Host in upper case", "GET /{m} HTTP/1.1\r\nHost: LOCALHOST\r\n\r\n"),
    ("Content-Length: 0 on GET", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 0\r\n\r\n"),
    ("Content-Length with leading zeros",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nContent-Length: 005\r\n\r\nhello"),
    ("chunked in upper case",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("chunk size with leading zeros",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n005\r\nhello\r\n0\r\n\r\n"),
    ("chunk size with trailing space",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n"),
    ("TE with spaces around chunked",
     "POST /{m} HTTP/1.1\r\nHost: {h}\r\nTransfer-Encoding:  chunked \r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    ("Connection: close, keep-alive", "GET /{m} HTTP/1.1\r\nHost: {h}\r\nConnection: close, keep-alive\r\n\r\n"),
    ("X-Forwarded-For from the client",
     "GET /{m} HTTP/1.1\r\nHost: {h}\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"),
    ("very many small fields", "GET /{m} HTTP/1.1\r\nHost: {h}\r\n" +
     "".join(f"X-F{i}: {i}\r\n" for i in range(90)) + "\r\n"),
]

# Fields a proxy sets itself, or that carry framing: compared separately or not at all.
PROXY_FIELDS = {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip",
                "x-request-id", "connection", "keep-alive", "upgrade", "content-length",
                "transfer-encoding", "host"}

# Where moat may forward what nginx refuses, or forward it differently, and why.
EXPLAINED = {
    "hop-by-hop fields named in Connection are dropped": "moat drops the fields the client's "
    "Connection names and Proxy-Connection (RFC 9110 §7.6.1); nginx forwards them",
    "h2c upgrade is not passed on": "moat drops HTTP2-Settings with the h2c upgrade it refuses; "
                                    "nginx forwards the field",
}


def _seed_inputs():
    """The fuzzer's request seeds (first byte 0 selects request parsing in http1_fuzz.c),
    aimed at the test site and marked with a field so the apps' records can be told apart."""
    out = []
    if SEEDS.is_dir():
        for f in sorted(SEEDS.iterdir())[:200]:
            data = f.read_bytes()
            if not data or data[0] != 0:
                continue
            text = data[1:].decode("latin-1").replace("example.com", "{h}")
            eol = "\r\n" if "\r\n" in text else "\n"
            line, sep, rest = text.partition(eol)
            if sep:
                out.append((f"seed {f.name}", f"{line}{eol}X-Mark: {{m}}{eol}{rest}"))
    return out


INPUTS = [(r[0], r[1]) for r in ROWS] + EXTRA + _seed_inputs()


class Side:
    def __init__(self, proxy, app):
        self.p, self.app = proxy, app

    def send(self, raw):
        """The final status (or None when the connection ended without one)."""
        try:
            tcp = socket.create_connection(("127.0.0.1", self.p.https_port), timeout=5)
            with tls_context(self.p.ca).wrap_socket(tcp, server_hostname="localhost") as s:
                try:
                    s.sendall(raw)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass
                s.settimeout(2)
                buf = b""
                for _ in range(200):
                    if b"\r\n\r\n" in buf and not buf.startswith(b"HTTP/1.1 1"):
                        break
                    if buf.startswith(b"HTTP/1.1 1") and buf.count(b"\r\n\r\n") >= 2:
                        buf = buf.split(b"\r\n\r\n", 1)[1]
                        continue
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                return int(buf.split(b" ", 2)[1]) if buf.startswith(b"HTTP/") else None
        except (OSError, ValueError, IndexError):
            return None


@pytest.fixture(scope="module")
def sides(tmp_path_factory, request):
    if base.TARGET != "moat":
        pytest.skip("compares moat with nginx; run with the default target")
    if not shutil.which(base.NGINX_BIN) and not Path(base.NGINX_BIN).exists():
        pytest.skip(f"nginx not installed ({base.NGINX_BIN}): apt-get install nginx-light")
    base.require_moat()
    apps = [RecordingUpstream(), RecordingUpstream()]
    m = base.MoatProxy(tmp_path_factory.mktemp("diff-moat"), apps[0].addr)
    n = base.NginxProxy(tmp_path_factory.mktemp("diff-nginx"), apps[1].addr,
                        request.getfixturevalue("test_ca"))
    m.start()
    n.start()
    yield Side(m, apps[0]), Side(n, apps[1])
    for p in (m, n):
        p.stop()
    for a in apps:
        a.shutdown()
        a.server_close()


def _normal(rec):
    fields = {k: v for k, v in rec["fields"].items() if k not in PROXY_FIELDS}
    return rec["line"].split(" ")[0], rec["line"].split(" ")[1], rec["body"], fields


def test_moat_forwards_nothing_nginx_refuses_and_forwards_the_same(sides):
    moat, nginx = sides
    stricter, both_refuse, same, unexplained, explained = [], 0, 0, [], []
    for name, template in INPUTS:
        mark = "d" + uuid.uuid4().hex[:12]
        raw = template.replace("{m}", mark).replace("{h}", "localhost").encode("latin-1")
        ms, ns = moat.send(raw), nginx.send(raw)
        mseen, nseen = moat.app.find(mark), nginx.app.find(mark)
        if not mseen and not nseen:
            both_refuse += 1
        elif not mseen:
            stricter.append(f"{name} (moat {ms}, nginx {ns})")
        elif not nseen:
            (explained if name in EXPLAINED else unexplained).append(
                f"{name}: moat forwarded it ({ms}), nginx answered {ns}")
        elif _normal(mseen[-1]) != _normal(nseen[-1]):
            (explained if name in EXPLAINED else unexplained).append(
                f"{name}: moat sent {_normal(mseen[-1])}, nginx sent {_normal(nseen[-1])}")
        else:
            same += 1
    print(f"\n{len(INPUTS)} inputs: {same} forwarded alike, {both_refuse} refused by both, "
          f"{len(stricter)} refused by moat only, {len(explained)} explained differences")
    for s in stricter:
        print(f"  moat stricter: {s}")
    for e in explained:
        print(f"  explained: {e}")
    assert not unexplained, "moat forwards what nginx does not:\n" + "\n".join(unexplained)
    assert same >= 10  # the comparison did run on requests both forward
