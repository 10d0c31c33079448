"""Part 8 (2): app restarts are bridged. While no upstream accepts connections a request
waits (upstream_wait=, 10 s by default) and moat keeps dialling; after that the answer is 502
with Retry-After, a page that retries by itself for a browser page load; past the waiting
limit, 503 at once.

The tests that need moat's options (upstream_wait=, --workers) are moat_only; the others run
against nginx too (MOAT_TEST_TARGET=nginx), which has no such wait and fails them.
Figures are printed as "FIGURE" lines (pytest -s) and appended to $MOAT_TEST_FIGURES.
"""

import asyncio
import json
import os
import subprocess
import threading
import time

import pytest

from h2util import RawH2
from helpers import curl, free_port, write_random_file
from owui_util import CHROMIUM, Chromium, Standin, figure, ssl_ctx


@pytest.fixture
def apps(tmp_path):
    """Factory: apps(name, port=None, start=True) -> a stand-in that can stop and start again
    on the same port (the app restarting). Stopped at teardown."""
    made = []

    def make(name, port=None, start=True):
        s = Standin(tmp_path, name, port=port)
        made.append(s)
        return s.start() if start else s

    yield make
    for s in made:
        s.stop()


def _curl_args(p, proto):
    return [*p.curl_args(), "--http2" if proto == "h2" else "--http1.1", "--max-time", "30"]


def _spawn_curl(args, url, *extra):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *args,
                             *extra, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_three_second_restart_loses_no_request(proxy, apps, proto):
    app = apps("app")
    p = proxy(app.addr)
    args = _curl_args(p, proto)
    assert curl(*args, "-o", "/dev/null", "-w", "%{http_code}",
                p.url("/health")).stdout_text == "200"

    # The app goes away 1 s in and is started again 3 s later (uvicorn then takes a moment
    # to listen), while a client sends one request every 100 ms for 6 s.
    t0 = time.monotonic()
    downtime = {}

    def restart():
        time.sleep(1.0)
        app.stop()
        downtime["stopped"] = time.monotonic()
        time.sleep(max(0.0, downtime["stopped"] + 3.0 - time.monotonic()))
        app.launch()
        app.wait_healthy()
        downtime["healthy"] = time.monotonic()

    th = threading.Thread(target=restart)
    th.start()
    procs = []
    for i in range(60):
        time.sleep(max(0.0, t0 + i * 0.1 - time.monotonic()))
        procs.append(_spawn_curl(args, p.url(f"/health?i={i}")))
    th.join(30)
    codes = []
    for pr in procs:
        out, _ = pr.communicate(timeout=40)
        codes.append(out.decode() or "000")
    failures = [c for c in codes if c != "200"]
    figure(f"restart {proto}: failures of {len(codes)}", len(failures))
    figure(f"restart {proto}: app away (s)",
           round(downtime.get("healthy", 0) - downtime.get("stopped", 0), 2))
    assert "healthy" in downtime, "the stand-in did not come back"
    assert not failures, f"{len(failures)} of {len(codes)} requests failed: {codes}"


@pytest.mark.parametrize("proto", ["h1", "h2"])
def test_post_body_during_restart_arrives_intact(proxy, apps, tmp_path, proto):
    app = apps("late", start=False)
    p = proxy(app.addr)
    body = tmp_path / "body.bin"
    size = 3 << 20  # past every window and high-water mark: backpressure, not buffering
    digest = write_random_file(body, size)
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    t0 = time.monotonic()
    pr = subprocess.Popen(["curl", "-sS", "-o", str(out), "-w", "%{http_code}",
                           *_curl_args(p, proto), "-H", "Content-Type: application/octet-stream",
                           "--data-binary", f"@{body}", p.url("/echo")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    time.sleep(1.0)  # the scenario: the upload starts while the app is away
    assert pr.poll() is None, f"answered before the app was up: {pr.communicate()}"
    app.launch().wait_healthy()
    code, err = pr.communicate(timeout=30)
    took = time.monotonic() - t0
    assert code.decode() == "200", (code, err)
    echo = json.loads(out.read_text())
    figure(f"POST {proto} 3 MiB across a restart (s)", round(took, 2))
    assert echo["body_len"] == size
    assert echo["body_sha256"] == digest


def test_websocket_upgrade_waits_for_the_app(proxy, apps):
    app = apps("ws", start=False)
    p = proxy(app.addr)

    async def talk():
        import websockets
        async with websockets.connect(f"wss://localhost:{p.https_port}/ws/echo",
                                      ssl=ssl_ctx(p.ca), open_timeout=20) as w:
            await w.send("still here")
            return await asyncio.wait_for(w.recv(), 5)

    result = {}

    def client():
        try:
            result["got"] = asyncio.run(talk())
        except Exception as e:  # reported below
            result["error"] = repr(e)

    th = threading.Thread(target=client)
    th.start()
    time.sleep(1.0)  # the scenario: the upgrade arrives while the app is away
    app.launch().wait_healthy()
    th.join(30)
    assert result.get("got") == "still here", result


@pytest.mark.moat_only
def test_app_away_longer_than_upstream_wait(moat):
    p = moat(f"127.0.0.1:{free_port()}", site_opts=["upstream_wait=1s"])
    with p.client() as c:
        t0 = time.monotonic()
        r = c.get(p.url("/api/config"), headers={"Accept": "application/json"})
        took = time.monotonic() - t0
        assert r.status_code == 502
        assert r.headers.get("retry-after") == "5"
        assert len(r.content) < 1024, "an API client gets a short body"
        assert 0.9 <= took < 3, f"answered after {took:.2f} s, upstream_wait is 1 s"
        r = c.get(p.url("/c/123?x=1"), headers={"Accept": "text/html,application/xhtml+xml"})
        assert r.status_code == 502 and r.headers.get("retry-after") == "5"
        assert r.headers["content-type"].startswith("text/html")
        assert "<script" in r.text and "location.reload()" in r.text and \
            "fetch(location.href" in r.text, "the page must retry the same URL by itself"
        assert 'http-equiv="refresh"' in r.text, "and without JavaScript too"
        # A POST is not a page load: the short answer.
        r = c.post(p.url("/api/chat"), headers={"Accept": "text/html"}, content=b"{}")
        assert r.status_code == 502 and "<script" not in r.text
    # The same over HTTP/2.
    cp = curl(*p.curl_args(), "--http2", "-H", "Accept: text/html", "-D", "-",
              "-w", "\n%{http_code} %{http_version}", p.url("/"))
    assert cp.stdout_text.rstrip().endswith("502 2"), cp.stdout_text
    assert "retry-after: 5" in cp.stdout_text.lower() and "location.reload()" in cp.stdout_text
    figure("502 after upstream_wait=1s (s)", round(took, 2))


@pytest.mark.moat_only
def test_upstream_wait_0_answers_at_once(moat):
    p = moat(f"127.0.0.1:{free_port()}", site_opts=["upstream_wait=0"])
    with p.client() as c:
        t0 = time.monotonic()
        r = c.get(p.url("/health"))
        took = time.monotonic() - t0
    assert r.status_code == 502 and r.headers.get("retry-after") == "5"
    assert took < 0.5, f"upstream_wait=0 still waited {took:.2f} s"


@pytest.mark.moat_only
@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_upload_to_an_app_that_is_down_shows_the_502(moat, tmp_path, http):
    """The answer comes before the body was read: the client must still see the 502 (over
    HTTP/2, moat reads and drops the rest of the body instead of resetting the stream, which
    curl reports as a failed transfer)."""
    p = moat(f"127.0.0.1:{free_port()}", site_opts=["upstream_wait=0"])
    body = tmp_path / "upload.bin"
    body.write_bytes(os.urandom(3 << 20))
    cp = curl(*p.curl_args(), http, "-sS", "-o", "/dev/null", "-w", "%{http_code}",
              "--data-binary", f"@{body}", p.url("/api/v1/files/"), timeout=60)
    out = cp.stdout.decode() if isinstance(cp.stdout, bytes) else cp.stdout
    assert cp.returncode == 0 and out == "502", (cp.returncode, out, cp.stderr)


@pytest.mark.moat_only
def test_browser_page_retries_until_the_app_is_back(moat, apps, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip("Debian chromium not installed (packaging/deps.sh --test)")
    app = apps("back", start=False)
    p = moat(app.addr, site="chat.internal", site_opts=["upstream_wait=1s"])
    browser = Chromium(tmp_path, p.ca, "MAP chat.internal 127.0.0.1")
    url = f"https://chat.internal:{p.https_port}/?from=test"
    try:
        session = browser.open_page(url)
        assert browser.evaluate(session, "document.title") == "Restarting"
        app.launch().wait_healthy()
        t_up = time.monotonic()
        title = None
        while time.monotonic() - t_up < 20:
            try:
                title = browser.evaluate(session, "(document.getElementById('title') || "
                                         "{}).textContent || ''", timeout=5)
            except RuntimeError:
                title = None  # the page is being replaced
            if title == "standin back":
                break
            time.sleep(0.2)
        shown = time.monotonic() - t_up
        href = browser.evaluate(session, "location.href")
    finally:
        browser.close()
    figure("browser shows the app after it is up (s)", round(shown, 2))
    assert title == "standin back", f"the page never showed the app (last: {title!r})"
    assert href == url, "the retrying page must keep the URL"


@pytest.mark.moat_only
def test_waiting_is_bounded_then_503(moat):
    # One worker, so that the per-worker limit (1,000 per site) is the whole process's.
    p = moat(f"127.0.0.1:{free_port()}", site_opts=["upstream_wait=30s"],
             extra_args=["--workers", "1"])
    conns = []
    try:
        n = 0
        for _ in range(8):  # 8 connections x 125 streams (128 at most per connection)
            c = RawH2(p.https_port, p.ca)
            c.handshake()
            conns.append(c)
            for k in range(125):
                c.get(1 + 2 * k, "/health")
                n += 1
        assert n == 1000
        # Every one of them is waiting (none answered yet) ...
        for c in conns:
            assert not [f for f in c.read_for(0.05) if f.type == 1], "answered while waiting"
        # ... so one more is refused at once.
        extra = RawH2(p.https_port, p.ca)
        conns.append(extra)
        extra.handshake()
        t0 = time.monotonic()
        extra.get(1, "/health")
        status, headers, body, _, _ = extra.response(1, timeout=5)
        took = time.monotonic() - t0
    finally:
        for c in conns:
            c.close()
    figure("the 1,001st waiting request answered in (s)", round(took, 3))
    assert status == 503, (status, headers, body)
    assert headers.get("retry-after") == "5"
    assert took < 1.0
    # The proxy is fine afterwards (the waiting requests were dropped with their clients).
    assert p.alive()

