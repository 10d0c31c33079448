"""Part 2: everything Open WebUI needs from the proxy in front of it (issue 3), proven with the
real binary, real clients (curl, httpx, python-socketio, websockets, headless Chromium) and
the stand-in Open WebUI (tests/fixtures/standin.py: FastAPI + python-socketio + uvicorn).

MOAT_TEST_TARGET=nginx runs the same proxy tests against a typical nginx configuration.
Measured figures (token spacing, memory) are printed as "FIGURE name: value" lines (run
pytest with -s to see them) and appended to $MOAT_TEST_FIGURES when it is set.
"""

import asyncio
import concurrent.futures
import hashlib
import json
import os
import re
import socket
import ssl
import time
import uuid

import httpx
import pytest

from conftest import TARGET, MoatProxy, _teardown, require_moat
from helpers import (curl, pattern_sha256, raw_https, read_response, uses_asan,
                     write_random_file)
from owui_util import (figure, Chromium, MemSampler, OwuiNginx, Standin, curl_line_arrivals,
                       spacing_summary, sse_arrivals, sha256_stream, ssl_ctx, token_times)

MB = 1 << 20
# Peak RSS growth allowed while 200 MB cross a release build (ASan builds: reported only).
RSS_GROWTH_MB = float(os.environ.get("MOAT_TEST_RSS_GROWTH_MB", "30"))


@pytest.fixture
def oproxy(tmp_path, request):
    """Factory: oproxy(upstream_addr, site="localhost", max_body=None, opts=()) -> a started
    moat (site line with max_body= and opts) or, with MOAT_TEST_TARGET=nginx, an nginx with
    the same body limit and server name. opts are moat-only site options."""
    if TARGET == "moat":
        require_moat()
    started = []

    def make(upstream_addr, site="localhost", max_body=None, opts=()):
        d = tmp_path / f"{TARGET}{len(started)}"
        if TARGET == "nginx":
            p = OwuiNginx(d, upstream_addr, request.getfixturevalue("test_ca"), site=site,
                          max_body=max_body and max_body.lower())
        else:
            site_opts = list(opts) + ([f"max_body={max_body}"] if max_body else [])
            p = MoatProxy(d, upstream_addr, site=site, site_opts=site_opts)
        started.append(p)
        return p.start()

    yield make
    _teardown(request, started)


@pytest.fixture
def standins(tmp_path):
    """Factory for extra stand-ins: standins(name, http="h11", port=None, start=True)."""
    made = []

    def make(name, http="httptools", port=None, start=True):
        s = Standin(tmp_path, name, http=http, port=port)
        made.append(s)
        return s.start() if start else s

    yield make
    for s in made:
        s.stop()


def _echo_headers(echo):
    d = {}
    for k, v in echo["headers"]:
        d.setdefault(k.lower(), []).append(v)
    return d


def _sio_client(p):
    import requests
    import socketio
    sess = requests.Session()
    sess.verify = str(p.ca)
    sess.trust_env = False
    return socketio.Client(http_session=sess, reconnection=False)


# ---------------------------------------------------------------------------------------------
# Headers


def test_headers_seen_by_app(oproxy, upstream):
    p = oproxy(upstream.addr)
    host = f"localhost:{p.https_port}"
    with p.client() as c:
        r = c.get(p.url("/echo"), headers={"X-Forwarded-For": "6.6.6.6",
                                           "X-Forwarded-Proto": "http",
                                           "X-Forwarded-Host": "evil.example",
                                           "Cookie": "token=" + "x" * 20000})
    assert r.status_code == 200
    h = _echo_headers(r.json())
    assert h["host"] == [host], "Host must reach the app unchanged, port included"
    assert h["x-forwarded-proto"] == ["https"]
    assert h["x-forwarded-host"] == [host]
    assert h["x-forwarded-for"] == ["127.0.0.1"], "a client-sent X-Forwarded-For must be replaced"
    assert len(h["cookie"][0]) == 20006, "a large OAuth-style cookie must pass intact"
    assert "upgrade" not in h and "upgrade" not in ",".join(h.get("connection", [])).lower()
    assert r.json()["scheme"] == "https"  # what FastAPI builds redirects and OAuth URIs from


@pytest.mark.moat_only
def test_trusted_proxies_keep_the_chain_and_log_the_client(moat, upstream):
    p = moat(upstream.addr, site_opts=["trusted_proxies=127.0.0.0/8"])
    with p.client() as c:
        r = c.get(p.url("/echo?trusted=1"),
                  headers={"X-Forwarded-For": "203.0.113.9, 198.51.100.7",
                           "X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example.com"})
    h = _echo_headers(r.json())
    assert h["x-forwarded-for"] == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]
    assert h["x-forwarded-host"] == ["chat.example.com"]
    entries, deadline = [], time.monotonic() + 5  # the access log is written after the response
    while not entries and time.monotonic() < deadline:
        entries = [e for e in p.access_entries() if "trusted=1" in e.get("path", "")]
        time.sleep(0.05)
    assert entries and entries[-1]["remote"] == "198.51.100.7", entries


# ---------------------------------------------------------------------------------------------
# Streaming: tokens must arrive spread out, as the app sent them


def test_sse_tokens_arrive_spread_out(oproxy, upstream):
    p = oproxy(upstream.addr)
    with p.client() as c:
        status, headers, events, t_head = sse_arrivals(
            c, p.url("/api/chat/completions"), {"tokens": 20, "gap": 0.1})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers.get("content-encoding") is None, "moat must not compress"
    assert events[-1][1] == "[DONE]" and len(events) == 21
    s = spacing_summary(token_times(events))
    figure("sse 20 tokens @100ms, gaps at the client", s)
    assert s["median_ms"] >= 80, f"tokens arrived bunched: {s}"
    assert s["span_ms"] >= 1500, f"tokens arrived in one lump: {s}"


def test_ndjson_lines_arrive_spread_out_with_curl(oproxy, upstream):
    p = oproxy(upstream.addr)
    rc, lines, err = curl_line_arrivals(
        [*p.curl_args(), "-X", "POST", p.url("/ollama/api/pull?steps=20&gap=0.1")])
    assert rc == 0, err
    docs = [json.loads(l) for _, l in lines]
    assert docs[0]["status"] == "pulling manifest" and docs[-1]["status"] == "success"
    times = [t for (t, _), d in zip(lines, docs) if d["status"] == "pulling standin"]
    s = spacing_summary(times)
    figure("ndjson 20 lines @100ms via curl, gaps at the client", s)
    assert len(times) == 20 and s["median_ms"] >= 80, s


def test_100_concurrent_sse_streams(oproxy, upstream):
    p = oproxy(upstream.addr)
    n = 100

    async def one(c, i):
        t0 = time.monotonic()
        times, done = [], False
        async with c.stream("POST", p.url(f"/api/chat/completions?i={i}"),
                            json={"tokens": 10, "gap": 0.2}) as r:
            assert r.status_code == 200
            buf = b""
            async for chunk in r.aiter_raw():
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    if ev == b"data: [DONE]":
                        done = True
                    elif ev.startswith(b"data: "):
                        times.append(time.monotonic() - t0)
        return times, done

    async def run():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(verify=ssl_ctx(p.ca), limits=limits, timeout=60,
                                     trust_env=False) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    t0 = time.monotonic()
    results = asyncio.run(run())
    wall = time.monotonic() - t0
    assert all(done and len(times) == 10 for times, done in results)
    spans = sorted(times[-1] - times[0] for times, _ in results)
    figure("100 concurrent SSE streams (10 tokens @200ms)",
           {"wall_s": round(wall, 2), "min_span_s": round(spans[0], 2),
            "median_span_s": round(spans[n // 2], 2)})
    assert wall < 12, f"streams were not served concurrently ({wall:.1f} s)"
    assert spans[0] >= 1.2, f"a stream arrived in one lump: span {spans[0]:.2f} s"


# ---------------------------------------------------------------------------------------------
# socket.io and websockets


def test_socketio_connects_over_websocket_and_streams_events(oproxy, upstream):
    p = oproxy(upstream.addr)
    sio = _sio_client(p)
    deltas = []
    sio.on("delta", lambda d: deltas.append((time.monotonic(), d)))
    sio.connect(f"https://localhost:{p.https_port}", socketio_path="/ws/socket.io",
                transports=["websocket"], wait_timeout=10)
    try:
        assert sio.transport() == "websocket"
        ack = sio.call("chat", {"n": 20, "gap": 0.1}, timeout=20)
    finally:
        sio.disconnect()
    assert ack == {"ok": True, "n": 20}
    assert [d["i"] for _, d in deltas] == list(range(20))
    s = spacing_summary([t for t, _ in deltas])
    figure("socket.io 20 deltas @100ms, gaps at the client", s)
    assert s["median_ms"] >= 80, s


@pytest.mark.slow
def test_slow_first_byte_60s_and_idle_websocket_90s(oproxy, upstream):
    """Run in parallel threads: an SSE reply whose first token comes after 60 s, a plain
    websocket silent for 90 s (no pings either way), and a socket.io session held 90 s."""
    p = oproxy(upstream.addr)

    def sse_late():
        with p.client(timeout=httpx.Timeout(120, connect=10)) as c:
            t0 = time.monotonic()
            status, _, events, t_head = sse_arrivals(
                c, p.url("/api/chat/completions"),
                {"first_byte_delay": 60, "tokens": 10, "gap": 0.1})
        first = events[0][0] - t0 if events else None
        return status, t_head, first, len(events), spacing_summary(token_times(events))

    async def ws_idle():
        import websockets
        url = f"wss://localhost:{p.https_port}/ws/echo"
        async with websockets.connect(url, ssl=ssl_ctx(p.ca), ping_interval=None,
                                      close_timeout=2) as ws:
            await ws.send("before")
            assert await asyncio.wait_for(ws.recv(), 5) == "before"
            await asyncio.sleep(90)
            await ws.send("after 90 s idle")
            return await asyncio.wait_for(ws.recv(), 5)

    def sio_held():
        sio = _sio_client(p)
        sio.connect(f"https://localhost:{p.https_port}", socketio_path="/ws/socket.io",
                    transports=["websocket"], wait_timeout=10)
        try:
            time.sleep(90)
            return sio.call("chat", {"n": 3, "gap": 0}, timeout=10)
        finally:
            sio.disconnect()

    with concurrent.futures.ThreadPoolExecutor(3) as ex:
        f_sse = ex.submit(sse_late)
        f_ws = ex.submit(lambda: asyncio.run(ws_idle()))
        f_sio = ex.submit(sio_held)
        status, t_head, first, n, s = f_sse.result(timeout=150)
        ws_reply = f_ws.result(timeout=150)
        sio_ack = f_sio.result(timeout=150)
    figure("SSE with 60 s first-byte delay", {"head_s": round(t_head, 2),
                                              "first_token_s": round(first or -1, 2), **s})
    assert status == 200 and n == 11
    assert t_head < 5, "response headers must be passed on at once"
    assert 59 <= first < 65 and s["median_ms"] >= 80, s
    assert ws_reply == "after 90 s idle"
    assert sio_ack == {"ok": True, "n": 3}


# ---------------------------------------------------------------------------------------------
# Big bodies


@pytest.mark.slow
def test_200mb_upload_and_download_intact_with_bounded_memory(oproxy, upstream, tmp_path):
    p = oproxy(upstream.addr)
    size = 200 * MB
    f = tmp_path / "upload.bin"
    sha = write_random_file(f, size)
    curl(*p.curl_args(), "-o", "/dev/null", p.url("/health"), check=True)  # warm-up
    base = p.mem_kib()[1]

    mem = MemSampler(p)
    mem.start()
    t0 = time.monotonic()
    cp = curl(*p.curl_args(), "-X", "POST", "-T", str(f), "-H",
              "Content-Type: application/octet-stream", p.url("/echo"), timeout=300)
    up_s = time.monotonic() - t0
    up_rss = mem.stop()
    assert cp.returncode == 0, cp.stderr_text
    echo = json.loads(cp.stdout_text)
    assert (echo["body_len"], echo["body_sha256"]) == (size, sha)

    mem = MemSampler(p)
    mem.start()
    t0 = time.monotonic()
    with p.client(timeout=120) as c:
        with c.stream("GET", p.url(f"/download?size={size}")) as r:
            assert r.status_code == 200
            n, got = sha256_stream(r.iter_raw(1 << 20))
    down_s = time.monotonic() - t0
    down_rss = mem.stop()
    assert (n, got) == (size, pattern_sha256(size))

    asan = TARGET == "moat" and uses_asan(p.pid)
    figure("200 MB transfers, proxy RSS (KiB)",
           {"build": "asan" if asan else "release", "rss_before": base,
            "max_rss_upload": up_rss, "max_rss_download": down_rss,
            "upload_MBps": round(200 / up_s), "download_MBps": round(200 / down_s)})
    if asan:
        return  # ASan's quarantine and shadow memory, not moat, dominate RSS
    growth = (max(up_rss, down_rss) - base) / 1024
    assert growth < RSS_GROWTH_MB, f"RSS grew {growth:.1f} MiB while 200 MB passed"


# ---------------------------------------------------------------------------------------------
# Redirects, limits, errors


def test_fastapi_307_location_is_https_with_port(oproxy, upstream):
    p = oproxy(upstream.addr)
    with p.client(follow_redirects=False) as c:
        r = c.get(p.url("/api/v1/files"))
        assert r.status_code == 307
        assert r.headers["location"] == f"https://localhost:{p.https_port}/api/v1/files/"
        assert c.get(r.headers["location"]).status_code == 200


def test_413_when_content_length_exceeds_max_body_app_never_sees_it(oproxy, upstream):
    p = oproxy(upstream.addr, max_body="1M")
    for expect in ("", "Expect: 100-continue\r\n"):
        mark = uuid.uuid4().hex
        head = (f"POST /echo?m={mark} HTTP/1.1\r\nHost: localhost:{p.https_port}\r\n"
                f"Content-Type: application/octet-stream\r\n{expect}"
                f"Content-Length: {2 * MB}\r\n\r\n").encode()
        # Only the head is sent: the 413 must come before any body byte is read.
        r = raw_https(p.https_port, p.ca, head, timeout=10)
        assert r.status == 413, r
        assert not any(mark in x for x in upstream.stats()["paths"]), "the app saw the request"
    # Under the limit is fine.
    with p.client() as c:
        assert c.post(p.url("/echo"), content=b"x" * (MB - 10)).json()["body_len"] == MB - 10


def test_chunked_upload_over_max_body_closes_the_connection(oproxy, upstream):
    p = oproxy(upstream.addr, max_body="1M")
    head = (f"POST /echo HTTP/1.1\r\nHost: localhost:{p.https_port}\r\n"
            f"Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"%x\r\n" % (64 * 1024) + b"y" * (64 * 1024) + b"\r\n"
    with socket.create_connection(("127.0.0.1", p.https_port), timeout=10) as tcp:
        with ssl_ctx(p.ca).wrap_socket(tcp, server_hostname="localhost") as s:
            s.sendall(head.encode())
            sent = 0
            try:
                for _ in range(64):  # 4 MiB, never terminated
                    s.sendall(piece)
                    sent += 64 * 1024
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
            try:
                r = read_response(s, timeout=10)
                status = r.status
                # After the answer the connection must end, not wait for another request.
                s.settimeout(5)
                rest = s.recv(100)
            except (ConnectionError, ssl.SSLError, OSError):
                status, rest = None, b""
    assert status in (413, None), f"got {status}: the oversized body was accepted"
    assert rest == b"", "the connection stayed open after an oversized body"
    figure("chunked over max_body", {"status": status, "sent_kib_before_stop": sent // 1024})


def test_502_while_app_starts_then_recovers(oproxy, standins):
    late = standins("late", start=False)
    p = oproxy(late.addr, opts=["upstream_wait=300ms"])  # the 502 comes after that wait
    with p.client() as c:
        r = c.get(p.url("/health"))
        assert r.status_code == 502
        assert "starting" in r.text, "the 502 page should say the app may still be starting"
        late.launch().wait_healthy()
        t_up = time.monotonic()
        while True:
            r = c.get(p.url("/health"))
            if r.status_code == 200 or time.monotonic() - t_up > 15:
                break
            time.sleep(0.1)
    recovery = time.monotonic() - t_up
    figure("recovery after the app came up (s)", round(recovery, 2))
    assert r.status_code == 200 and r.headers["x-standin"] == "late"
    assert recovery < 3, f"the proxy kept answering 502 for {recovery:.1f} s after the app was up"


def test_expect_100_continue_answered_before_the_body(oproxy, upstream):
    p = oproxy(upstream.addr)
    body = os.urandom(300 * 1024)
    head = (f"POST /echo HTTP/1.1\r\nHost: localhost:{p.https_port}\r\n"
            f"Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", p.https_port), timeout=10) as tcp:
        with ssl_ctx(p.ca).wrap_socket(tcp, server_hostname="localhost") as s:
            s.sendall(head)
            t0 = time.monotonic()
            got = b""
            s.settimeout(5)
            while b"\r\n\r\n" not in got:
                data = s.recv(4096)
                assert data, "connection closed before 100 Continue"
                got += data
            waited = time.monotonic() - t0
            interim, rest = got.split(b"\r\n\r\n", 1)
            assert re.match(rb"HTTP/1\.1 100 ", interim), got
            assert rest == b""
            s.sendall(body)
            r = read_response(s, timeout=10)
    assert r.status == 200, r
    assert r.json()["body_len"] == len(body)
    assert r.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    figure("100 Continue after (ms)", round(waited * 1000, 1))
    assert waited < 1.0


# ---------------------------------------------------------------------------------------------
# uvicorn's two HTTP parsers: h11 answers 400 to "Connection: upgrade" on ordinary requests


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_uvicorn_parsers_get_no_upgrade_on_ordinary_requests(oproxy, standins, parser):
    app = standins(parser, http=parser)
    p = oproxy(app.addr)
    with p.client(follow_redirects=False) as c:
        r = c.get(p.url("/echo"))
        assert r.status_code == 200, r.text
        h = _echo_headers(r.json())
        assert "upgrade" not in h, h
        assert "upgrade" not in ",".join(h.get("connection", [])).lower(), h
        assert c.post(p.url("/echo"), content=b"z" * 100000).json()["body_len"] == 100000
        assert c.get(p.url("/api/v1/files")).status_code == 307
        status, _, events, _ = sse_arrivals(c, p.url("/api/chat/completions"),
                                            {"tokens": 5, "gap": 0.02})
        assert status == 200 and len(events) == 6

    async def ws():
        import websockets
        async with websockets.connect(f"wss://localhost:{p.https_port}/ws/echo",
                                      ssl=ssl_ctx(p.ca)) as w:
            await w.send("hi")
            return await asyncio.wait_for(w.recv(), 5)

    assert asyncio.run(ws()) == "hi"  # and an upgrade still is one


# ---------------------------------------------------------------------------------------------
# lb=cookie: socket.io's polling mode needs every request of a session on the same replica


@pytest.mark.moat_only
def test_lb_cookie_sticks_to_one_upstream(moat, standins):
    a, b = standins("A"), standins("B")
    p = moat(f"{a.addr},{b.addr}", site_opts=["lb=cookie"])
    seen = set()
    # Fresh clients are spread by round robin (each worker keeps its own position, so a few
    # clients may be needed to see both), and each one then sticks to its upstream.
    for i in range(12):
        with p.client() as c:
            r = c.get(p.url("/health"))
            cookie = r.headers.get("set-cookie", "")
            assert re.match(r"moat_upstream=[0-9a-f]{8}; Path=/; HttpOnly; SameSite=Lax; Secure",
                            cookie), cookie
            first = r.headers["x-standin"]
            got = {c.get(p.url(f"/health?i={j}")).headers["x-standin"] for j in range(6)}
            assert got == {first}, f"client {i}'s requests went to {got}"
            assert "set-cookie" not in c.get(p.url("/health")).headers
            seen.add(first)
        if i >= 3 and seen == {"A", "B"}:
            break
    assert seen == {"A", "B"}, "new clients should still be spread"
    # The sticky upstream goes away: the client moves and is told so.
    with p.client() as c:
        c.get(p.url("/health"))
        stuck = c.get(p.url("/health")).headers["x-standin"]
        (a if stuck == "A" else b).stop()
        r = c.get(p.url("/health"))
        if r.status_code == 502:  # the request that discovered the failure
            r = c.get(p.url("/health"))
        assert r.status_code == 200 and r.headers["x-standin"] != stuck
        assert "moat_upstream=" in r.headers.get("set-cookie", "")


# ---------------------------------------------------------------------------------------------
# A real browser


BROWSER_SCRIPT = r"""
(async () => {
  const out = {secure: window.isSecureContext, mediaDevices: !!navigator.mediaDevices,
               getUserMedia: !!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia),
               protocol: location.protocol,
               alpn: performance.getEntriesByType('navigation')[0].nextHopProtocol};
  // socket.io over its websocket transport, spoken frame by frame (Engine.IO 4 / Socket.IO 5,
  // what socket.io-client sends): open, connect, a chat event, streamed deltas.
  out.ws = await new Promise((resolve) => {
    const res = {connected: false, deltas: [], done: false};
    const ws = new WebSocket(`wss://${location.host}/ws/socket.io/?EIO=4&transport=websocket`);
    const timer = setTimeout(() => { res.error = 'timeout'; resolve(res); }, 15000);
    ws.onmessage = (e) => {
      const m = e.data;
      if (m.startsWith('0{')) ws.send('40');
      else if (m === '2') ws.send('3');
      else if (m.startsWith('40')) {
        res.connected = true;
        ws.send('42["chat",{"n":10,"gap":0.1}]');
      }
      else if (m.startsWith('42')) {
        const [name] = JSON.parse(m.slice(2));
        if (name === 'delta') res.deltas.push(performance.now());
        if (name === 'done') { res.done = true; clearTimeout(timer); ws.close(); resolve(res); }
      }
    };
    ws.onerror = () => { res.error = 'websocket error'; clearTimeout(timer); resolve(res); };
  });
  // An SSE completion read with fetch: each read() should bring a token, spread in time.
  const r = await fetch('/api/chat/completions', {method: 'POST',
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({tokens: 10, gap: 0.15})});
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  const reads = [];
  let text = '';
  for (;;) {
    const {done, value} = await reader.read();
    if (done) break;
    reads.push(performance.now());
    text += dec.decode(value, {stream: true});
  }
  out.sse = {status: r.status, type: r.headers.get('content-type'), reads,
             tokens: (text.match(/data: \{/g) || []).length, done: text.includes('[DONE]')};
  return out;
})()
"""


@pytest.mark.slow
def test_chromium_secure_context_socketio_and_streaming(oproxy, upstream, tmp_path):
    if not os.access("/usr/bin/chromium", os.X_OK):
        pytest.skip("Debian chromium not installed (packaging/deps.sh --test)")
    site = "chat.internal"
    p = oproxy(upstream.addr, site=site)
    browser = Chromium(tmp_path, p.ca, f"MAP {site} 127.0.0.1")
    try:
        session = browser.open_page(f"https://{site}:{p.https_port}/")
        assert browser.evaluate(session, "document.getElementById('title').textContent") \
            == "standin main"
        res = browser.evaluate(session, BROWSER_SCRIPT, timeout=60)
    finally:
        browser.close()
    sse = res["sse"]
    ws = res["ws"]
    ws_s = spacing_summary([t / 1000 for t in ws["deltas"]])
    sse_s = spacing_summary([t / 1000 for t in sse["reads"]])
    figure("chromium", {"secure": res["secure"], "alpn": res["alpn"], "ws_deltas": ws_s,
                        "sse_reads": sse_s})
    assert res["protocol"] == "https:"
    assert res["secure"] is True, "the page must be a secure context (voice calls need it)"
    assert res["mediaDevices"] is True and res["getUserMedia"] is True
    assert ws.get("error") is None and ws["connected"] and ws["done"], ws
    assert len(ws["deltas"]) == 10 and ws_s["median_ms"] >= 80, ws_s
    assert sse["status"] == 200 and sse["type"].startswith("text/event-stream")
    assert sse["tokens"] == 10 and sse["done"]
    assert sse_s["n"] >= 8 and sse_s["span_ms"] >= 1000, f"fetch got the stream in a lump: {sse_s}"
    if TARGET == "moat":
        # Part 3: the page arrives over HTTP/2 and the socket.io websocket rides on that same
        # connection as an RFC 8441 extended CONNECT (Caddy, nginx and Traefik open a
        # separate HTTP/1.1 connection for it).
        assert res["alpn"] == "h2", res["alpn"]
        deadline = time.monotonic() + 3
        ws_h2 = []
        while not ws_h2 and time.monotonic() < deadline:
            ws_h2 = [e for e in p.access_entries() if e.get("method") == "CONNECT"
                     and e.get("proto") == "HTTP/2" and e.get("path", "").startswith("/ws/")]
            time.sleep(0.05)
        assert ws_h2, "the websocket did not go over HTTP/2 (RFC 8441)"
