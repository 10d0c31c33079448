"""moat's own command line and the operator-facing edges of `moat run`: a port in use, the
pid-file commands, certificate listing, reload with a broken file, unknown hosts, HTTP/1.0
and pipelining. These exercise moat's CLI, so they are skipped for nginx."""

import json
import socket
import subprocess
import time

import pytest

from conftest import MOAT_BIN, require_moat
from helpers import free_port, raw_https, tail

pytestmark = pytest.mark.moat_only


def run(*args, timeout=20):
    return subprocess.run([MOAT_BIN, *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    require_moat()
    v = run("version")
    assert v.returncode == 0 and v.stdout.startswith("moat ")
    for args in (["help"], ["--help"], ["run", "--help"], ["certs", "--help"]):
        h = run(*args)
        assert h.returncode == 0, args
        assert "moat run" in h.stdout and "--https-port" in h.stdout, args
    bad = run("frobnicate")
    assert bad.returncode != 0 and "unknown command 'frobnicate'" in bad.stderr


def test_port_in_use_names_the_port_and_the_fix(tmp_path):
    require_moat()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    busy = blocker.getsockname()[1]
    try:
        t0 = time.monotonic()
        cp = run("run", "localhost", "127.0.0.1:9", "--listen", "127.0.0.1", "--data",
                 str(tmp_path / "d"), "--http-port", str(free_port()), "--https-port", str(busy))
        assert time.monotonic() - t0 < 5
        # Not 1: that code means "bad configuration" (systemd must not restart on it), while
        # a busy port may free up.
        assert cp.returncode not in (0, 1)
        assert f"port {busy}" in cp.stderr and "already in use" in cp.stderr
        assert "--https-port" in cp.stderr
    finally:
        blocker.close()


def test_stop_and_reload_through_the_pid_file(moat, upstream, upstream_factory):
    p = moat(upstream.addr)
    data = str(p.data)
    other = upstream_factory("B")
    p.set_upstream(other.addr)
    cp = run("reload", "--data", data)
    assert cp.returncode == 0, cp.stderr
    deadline = time.monotonic() + 5
    seen = None
    with p.client() as c:
        while time.monotonic() < deadline:
            seen = c.get(p.url("/health")).headers.get("x-standin")
            if seen == "B":
                break
            time.sleep(0.1)
    assert seen == "B"
    cp = run("stop", "--data", data, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert p.proc.wait(timeout=10) == 0
    assert not (p.data / "moat.pid").exists()
    cp = run("stop", "--data", data)
    assert cp.returncode == 1 and "no running moat" in cp.stderr


def test_reload_with_a_broken_file_keeps_serving(moat, upstream):
    p = moat(upstream.addr)
    p.config.write_text("localhost 127.0.0.1:9 max_bdy=1\n")
    p.reload()
    deadline = time.monotonic() + 5
    while "max_bdy" not in tail(p.stderr_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    err = tail(p.stderr_path)
    assert "Moatfile:1:" in err and "did you mean 'max_body'" in err
    assert "previous configuration" in err
    with p.client() as c:
        r = c.get(p.url("/health"))
    assert r.status_code == 200 and r.headers.get("x-standin") == "main"


def test_certs_lists_the_internal_certificate(moat, upstream):
    p = moat(upstream.addr)
    cp = run("certs", "--data", str(p.data))
    assert cp.returncode == 0, cp.stderr
    assert "localhost" in cp.stdout and "internal" in cp.stdout


def test_unknown_host_gets_404_and_unknown_sni_is_refused(moat, upstream):
    p = moat(upstream.addr)
    r = raw_https(p.https_port, p.ca,
                  b"GET / HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n")
    assert r.status == 404
    cp = subprocess.run(["curl", "-sS", "-o", "/dev/null", "--cacert", str(p.ca), "--resolve",
                         f"other.example:{p.https_port}:127.0.0.1",
                         f"https://other.example:{p.https_port}/"],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode != 0 and "unrecognized name" in cp.stderr.lower()


def test_http10_and_pipelined_requests(moat, upstream):
    p = moat(upstream.addr)
    r = raw_https(p.https_port, p.ca, b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
    assert r.status == 200
    two = (b"GET /echo?n=1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
           b"GET /echo?n=2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    import ssl
    ctx = ssl.create_default_context(cafile=str(p.ca))
    with socket.create_connection(("127.0.0.1", p.https_port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(two)
            data = b""
            while True:
                chunk = t.recv(65536)
                if not chunk:
                    break
                data += chunk
    assert data.count(b"HTTP/1.1 200") == 2
    assert data.index(b'"n=1"') < data.index(b'"n=2"') if b'"n=1"' in data else True


def test_access_log_has_one_json_line_per_request(moat, upstream):
    p = moat(upstream.addr)
    with p.client() as c:
        for i in range(3):
            assert c.get(p.url(f"/health?i={i}")).status_code == 200
    deadline = time.monotonic() + 3
    entries = []
    while time.monotonic() < deadline:
        entries = [e for e in p.access_entries() if e.get("path", "").startswith("/health?i=")]
        if len(entries) == 3:
            break
        time.sleep(0.05)
    assert len(entries) == 3
    e = entries[0]
    for key in ("time", "remote", "host", "method", "path", "proto", "status", "bytes_in",
                "bytes_out", "duration_ms", "upstream", "upstream_ms"):
        assert key in e, key
    assert e["status"] == 200 and e["method"] == "GET" and e["remote"] == "127.0.0.1"
    assert e["upstream"] == upstream.addr
    json.dumps(e)


def test_dual_stack_listener_reports_ipv4_clients_as_ipv4(moat, upstream):
    """With --listen :: one socket takes IPv4 and IPv6; IPv4 clients arrive as ::ffff:a.b.c.d
    and must still appear as a.b.c.d in X-Forwarded-For and the access log."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        p = moat(upstream.addr, extra_args=("--listen", "::"))
    except RuntimeError as e:
        if "bad --listen" in str(e) or "Address family" in str(e):
            pytest.skip(f"cannot listen on [::] here: {e}")
        raise
    with p.client() as c:
        echo = c.get(p.url("/echo")).json()
    xff = [v for k, v in echo["headers"] if k.lower() == "x-forwarded-for"]
    assert xff == ["127.0.0.1"], xff
    deadline = time.monotonic() + 3
    entries = []
    while not entries and time.monotonic() < deadline:
        entries = [e for e in p.access_entries() if e.get("path") == "/echo"]
        time.sleep(0.05)
    assert entries and entries[0]["remote"] == "127.0.0.1", entries


def test_head_keeps_the_content_length_over_http1_and_http2(moat, upstream):
    p = moat(upstream.addr)
    for proto in ("--http1.1", "--http2"):
        cp = subprocess.run(["curl", "-sS", "-I", proto, *p.curl_args(),
                             p.url("/download?size=12345")],
                            capture_output=True, text=True, timeout=20)
        assert cp.returncode == 0, cp.stderr
        head = cp.stdout.lower()
        assert " 200" in head.splitlines()[0], head
        assert "content-length: 12345" in head, (proto, head)
