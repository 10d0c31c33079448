"""`moat status` and its --json form: after traffic it shows the site with its certificate, the
upstream up with latency and counts, client connections by kind (HTTP/1.1, HTTP/2, websocket)
and the request rate; a dead upstream shows as down with its last error. One screen of at most
80 columns, no colour when stdout is not a terminal."""

import json
import socket
import subprocess
import time

import httpx
import pytest

from conftest import MOAT_BIN
from helpers import free_port, tls_context

pytestmark = pytest.mark.moat_only


def status(p, *extra):
    cp = subprocess.run([MOAT_BIN, "status", "--data", str(p.data), *extra],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode == 0, cp.stderr
    return cp.stdout


def status_json(p):
    return json.loads(status(p, "--json"))


def wait_for(p, cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    st = status_json(p)
    while not cond(st) and time.monotonic() < deadline:
        time.sleep(0.1)
        st = status_json(p)
    return st


def open_websocket(p):
    ctx = tls_context(p.ca)
    raw = socket.create_connection(("127.0.0.1", p.https_port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(b"GET /ws/echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head[:200]
    return s


def test_status_after_traffic(moat, upstream):
    p = moat(upstream.addr)
    with p.client() as c:
        for i in range(7):
            assert c.get(p.url(f"/health?i={i}")).status_code == 200
        assert c.get(p.url("/nowhere-404")).status_code == 404
    ws = open_websocket(p)
    h2 = httpx.Client(verify=str(p.ca), http2=True, trust_env=False, timeout=20)
    try:
        assert h2.get(p.url("/health")).http_version == "HTTP/2"
        st = wait_for(p, lambda st: st["connections"]["http2"] >= 1 and
                      st["connections"]["websocket"] >= 1 and st["requests"] >= 9)
        assert st["ok"] is True and st["workers"] >= 1 and st["pid"] == p.pid
        assert st["connections"]["http2"] == 1
        assert st["connections"]["websocket"] == 1
        assert st["storage"]["ok"] is True
        site = st["sites"][0]
        assert site["name"] == "localhost"
        # 7 + 1 over HTTP/1.1 and one over HTTP/2; the websocket counts when it ends.
        assert site["requests"] == 9, site
        assert site["by_status"]["2xx"] == 8 and site["by_status"]["4xx"] == 1
        cert = site["certificate"]
        assert cert["state"] == "valid" and cert["days_left"] >= 1
        assert "moat" in cert["issuer"] and cert["source"] == "internal"
        assert cert["next_renewal"] > time.time()
        up = st["upstreams"][0]
        assert up["name"] == upstream.addr and up["up"] is True
        assert up["requests"] >= 9 and up["failures"] == 0
        assert 0 < up["p50_ms"] <= up["p99_ms"]
        assert st["requests_per_s"] > 0

        text = status(p)
        lines = text.splitlines()
        assert all(len(line) <= 80 for line in lines), [x for x in lines if len(x) > 80]
        assert "\033[" not in text  # no colour into a pipe
        assert lines[0].startswith("moat ") and f"pid {p.pid}" in lines[0]
        assert "1 HTTP/2" in text and "1 websocket(s)" in text
        site_line = next(x for x in lines if x.startswith("localhost "))
        assert site_line.split()[1:5] == ["9", "8", "1", "0"]
        up_line = next(x for x in lines if x.startswith(upstream.addr))
        assert up_line.split()[1] == "up"
        assert "days left" in text
    finally:
        h2.close()
        ws.close()
    st = wait_for(p, lambda st: st["connections"]["websocket"] == 0 and
                  st["connections"]["http2"] == 0 and st["requests"] == 10)
    assert st["connections"]["websocket"] == 0 and st["connections"]["http2"] == 0
    assert st["sites"][0]["by_status"]["1xx"] == 1  # the websocket's 101, now it ended


def test_status_shows_a_dead_upstream_down(moat):
    dead = f"127.0.0.1:{free_port()}"
    # A first address longer than the SITE column: cut to fit, never past 80 columns.
    long_name = "a-site-name-much-longer-than-the-column.localhost"
    p = moat(dead, site=f"{long_name},localhost", site_opts=["upstream_wait=0"])
    with p.client() as c:
        assert c.get(p.url("/")).status_code in (502, 503)
    st = status_json(p)
    up = st["upstreams"][0]
    assert up["name"] == dead and up["up"] is False and up["failures"] >= 1
    assert "refused" in up["last_error"].lower()
    assert st["sites"][0]["by_status"]["5xx"] == 1
    assert st["sites"][0]["name"] == long_name
    text = status(p)
    assert any(x.startswith(dead) and x.split()[1] == "down" for x in text.splitlines())
    assert long_name[:35] + "~" in text
    assert "last error: " in text and all(len(x) <= 80 for x in text.splitlines())


def test_status_and_metrics_show_a_failing_acme_order(moat, upstream):
    """A public name whose CA cannot be reached: the certificate is pending, with the last
    ACME error and the next attempt; the metrics count the failed order and the backoff."""
    mport = free_port()
    ca = f"https://127.0.0.1:{free_port()}/dir"  # nothing listens there
    p = moat(upstream.addr, site="chat.test",
             extra_args=["--acme-ca", ca, "--metrics", f"127.0.0.1:{mport}"])
    st = wait_for(p, lambda st: "last_error" in st["sites"][0]["certificate"])
    cert = st["sites"][0]["certificate"]
    assert cert["state"] == "pending" and cert["id"] == "acme:chat.test"
    assert "cannot reach the CA" in cert["last_error"] and cert["failures"] == 1
    assert cert["next_attempt"] > time.time()
    text = status(p)
    assert "pending" in text and "last ACME error: cannot reach the CA" in text
    assert "next attempt:" in text and all(len(x) <= 80 for x in text.splitlines())
    m = httpx.get(f"http://127.0.0.1:{mport}/metrics", trust_env=False, timeout=10).text
    assert "\nmoat_acme_orders_total 1\n" in m and "\nmoat_acme_failures_total 1\n" in m
    assert "\nmoat_acme_backoff 1\n" in m

