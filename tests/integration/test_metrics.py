"""`--metrics ADDR:PORT`: GET /metrics in the Prometheus text format. promtool accepts a scrape
taken after traffic, and a real Prometheus started here (loopback, its own config and data in
tmp, a 1 s scrape interval) scrapes moat and answers a query with the request count."""

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.parse

import httpx
import pytest

from helpers import REPO, free_port, stop_process, tail, wait_port

pytestmark = pytest.mark.moat_only

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def scrape(port):
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10, trust_env=False)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return r.text


def value(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


def test_metrics_endpoint_and_promtool(moat, upstream):
    port = free_port()
    p = moat(upstream.addr, extra_args=["--metrics", f"127.0.0.1:{port}"])
    with p.client() as c:
        for i in range(5):
            assert c.get(p.url(f"/health?i={i}")).status_code == 200
        assert c.post(p.url("/echo"), content=b"x" * 1000).status_code == 200
    # A handshake for a name no site serves is refused, and counted as such.
    ctx = ssl.create_default_context(cafile=str(p.ca))
    with socket.create_connection(("127.0.0.1", p.https_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="other.example")
    text = scrape(port)
    for _ in range(50):  # the refusal is counted when moat sees the connection end
        if value(text, 'moat_tls_handshake_failures_total{reason="unknown_sni"}'):
            break
        time.sleep(0.05)
        text = scrape(port)
    assert value(text, 'moat_tls_handshake_failures_total{reason="unknown_sni"}') == 1
    assert value(text, 'moat_requests_total{site="localhost",method="GET",code="2xx"}') == 5
    assert value(text, 'moat_requests_total{site="localhost",method="POST",code="2xx"}') == 1
    assert value(text, 'moat_request_duration_seconds_count{site="localhost"}') == 6
    assert value(text, f'moat_upstream_up{{upstream="{upstream.addr}"}}') == 1
    assert value(text, 'moat_received_bytes_total{site="localhost"}') > 1000
    assert value(text, 'moat_tls_handshakes_total{kind="full"}') >= 1
    assert value(text, 'moat_certificate_expiry_seconds{cert="internal:localhost"}') > 0
    assert value(text, "process_resident_memory_bytes") > 1e6
    assert value(text, 'moat_reloads_total{result="ok"}') == 0
    if PROMTOOL is None:
        pytest.skip("promtool is not installed")
    cp = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                        text=True, timeout=30)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    # Only GET and HEAD of /metrics.
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(base + "/other", trust_env=False).status_code == 404
    assert httpx.post(base + "/metrics", trust_env=False).status_code == 405
    assert httpx.head(base + "/metrics", trust_env=False).status_code == 200


def test_metrics_option_is_checked(tmp_path):
    from conftest import MOAT_BIN, require_moat
    require_moat()
    cp = subprocess.run([MOAT_BIN, "run", "localhost", "127.0.0.1:9", "--listen", "127.0.0.1",
                         "--data", str(tmp_path / "d"), "--http-port", str(free_port()),
                         "--https-port", str(free_port()), "--metrics", "nonsense"],
                        capture_output=True, text=True, timeout=20)
    assert cp.returncode == 1 and "--metrics expects ADDRESS:PORT" in cp.stderr


def test_prometheus_scrapes_moat(moat, upstream, tmp_path):
    if PROMETHEUS is None:
        pytest.skip("prometheus is not installed")
    mport, pport = free_port(), free_port()
    p = moat(upstream.addr, extra_args=["--metrics", f"127.0.0.1:{mport}"])
    conf = tmp_path / "prometheus.yml"
    conf.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: moat
    static_configs:
      - targets: ['127.0.0.1:{mport}']
""")
    log = tmp_path / "prometheus.log"
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={conf}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{pport}"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        assert wait_port(pport, 20, prom), tail(log)
        with p.client() as c:
            for i in range(12):
                assert c.get(p.url(f"/health?i={i}")).status_code == 200
        query = 'sum(moat_requests_total{site="localhost",code="2xx"})'
        url = (f"http://127.0.0.1:{pport}/api/v1/query?"
               + urllib.parse.urlencode({"query": query}))
        got = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                r = httpx.get(url, timeout=5, trust_env=False).json()
            except (httpx.HTTPError, json.JSONDecodeError):
                r = {}
            res = r.get("data", {}).get("result", [])
            if res:
                got = float(res[0]["value"][1])
                if got == 12:
                    break
            time.sleep(0.5)
        assert got == 12, (got, tail(log))
        up = httpx.get(f"http://127.0.0.1:{pport}/api/v1/query?query=up",
                       trust_env=False).json()["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        # Every query of the Grafana dashboard is valid PromQL and finds moat's series.
        dash = json.loads((REPO / "packaging" / "grafana-dashboard.json").read_text())
        for panel in dash["panels"]:
            for t in panel["targets"]:
                q = (t["expr"].replace("$__rate_interval", "1m").replace("$site", ".*")
                     .replace("$job", ".*"))
                r = httpx.get(f"http://127.0.0.1:{pport}/api/v1/query",
                              params={"query": q}, timeout=10, trust_env=False).json()
                assert r["status"] == "success", (panel["title"], q, r)
            assert panel["title"]
    finally:
        stop_process(prom, timeout=10)
