"""Request ids: each access-log line carries a request id that the app receives as X-Request-Id
(an incoming X-Request-Id is kept only from trusted_proxies), and warnings about a request name
its site, client, connection and request id."""

import time

import httpx
import pytest

from helpers import free_port, tail

pytestmark = pytest.mark.moat_only


def app_ids(resp):
    return [v for k, v in resp.json()["headers"] if k.lower() == "x-request-id"]


def entry(p, path, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in p.access_entries() if e.get("path") == path]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no access-log line for {path}")


def test_app_sees_the_access_logs_request_id(moat, upstream):
    p = moat(upstream.addr)
    with p.client() as c:
        r = c.get(p.url("/echo?n=1"), headers={"X-Request-Id": "client-made-this"})
    ids = app_ids(r)
    assert len(ids) == 1 and ids[0] != "client-made-this"  # not from an untrusted client
    assert entry(p, "/echo?n=1")["request_id"] == ids[0]
    with httpx.Client(verify=str(p.ca), http2=True, trust_env=False, timeout=20) as c:
        r2 = c.get(p.url("/echo?n=2"))
    assert r2.http_version == "HTTP/2"
    ids2 = app_ids(r2)
    assert len(ids2) == 1 and ids2[0] != ids[0]
    assert entry(p, "/echo?n=2")["request_id"] == ids2[0]


def test_trusted_proxy_keeps_its_request_id(moat, upstream):
    p = moat(upstream.addr, site_opts=["trusted_proxies=127.0.0.1/32"])
    with p.client() as c:
        r = c.get(p.url("/echo?t=1"), headers={"X-Request-Id": "lb-4711.a_b"})
        bad = c.get(p.url("/echo?t=2"), headers={"X-Request-Id": "has spaces, and more"})
    assert app_ids(r) == ["lb-4711.a_b"]
    assert entry(p, "/echo?t=1")["request_id"] == "lb-4711.a_b"
    made = app_ids(bad)
    assert len(made) == 1 and " " not in made[0]
    assert entry(p, "/echo?t=2")["request_id"] == made[0]


@pytest.mark.parametrize("h2", [False, True], ids=["http1", "http2"])
def test_warning_names_site_client_conn_and_request(moat, h2):
    p = moat(f"127.0.0.1:{free_port()}", site_opts=["upstream_wait=0"])
    with httpx.Client(verify=str(p.ca), http2=h2, trust_env=False, timeout=20) as c:
        r = c.get(p.url("/down"))
    assert r.status_code in (502, 503) and r.http_version == ("HTTP/2" if h2 else "HTTP/1.1")
    rid = entry(p, "/down")["request_id"]
    deadline = time.monotonic() + 5
    while "marked down" not in tail(p.stderr_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in tail(p.stderr_path).splitlines() if "marked down" in x)
    assert "site=localhost client=127.0.0.1 conn=127.0.0.1:" in line
    assert f"request={rid}" in line
    assert (" stream=1 " in line) == h2, line
