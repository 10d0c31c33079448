"""packaging/docker/compose.yml run for real: moat's image in front of an Open WebUI stand-in.

The compose file is used as shipped, with an override file (written here) that swaps Open
WebUI's image for the stand-in's (tests/fixtures/standin.Dockerfile: standin.py with
Debian's FastAPI, python-socketio and uvicorn; no registry is reachable) and moat's for the
image built from this checkout (localhost/moat:test, shared with test_packaging.py through
podman_util), and puts both containers on a network this module creates and removes.
DOMAIN=localhost (moat's internal CA); moat's ports are published on 127.0.0.1 only
(MOAT_HTTP_PUBLISH / MOAT_HTTPS_PUBLISH). The only addresses used are loopback and the
containers' own.

podman-compose (Debian 12: 1.0.3) drives it: it runs the stack rootful on podman with the
suite's own storage (through --podman-path) and does what is needed here: two files merged,
an external network, `up -d --force-recreate SERVICE` and `restart SERVICE`. (docker-compose
would need dockerd running beside podman, with a second image store.)

Checked: HTTPS through moat to the app; socket.io (python-socketio client) through it; the
app's container recreated (a new address under the same name) is served again through moat
within 2 s of the new container being up, moat untouched, and no request in flight fails;
moat's container restarted serves the same certificate from its volume (no new issuance).
Set MOAT_SKIP_PACKAGING=1 to leave this out of a quick local run.
"""

import hashlib
import socket
import ssl
import threading
import time

import httpx
import pytest

from helpers import FIXTURES, REPO, free_port
from podman_util import (TAG, build_image, moat_image, podman_with_bases, run, skip_reason)

pytestmark = [pytest.mark.moat_only, pytest.mark.slow]

COMPOSE = REPO / "packaging" / "docker" / "compose.yml"
STANDIN_IMAGE = "localhost/moat-test-standin:bookworm"
# Within this long of the new app container answering, moat serves it again.
FOLLOW_S = 2.0


class Stack:
    def __init__(self, p, workdir):
        self.p = p
        self.project = f"moattest{TAG}"
        self.network = f"moat-test-net-{TAG}"
        self.http_port, self.https_port = free_port(), free_port()
        self.podman_path = p.wrapper(workdir)
        self.override = workdir / "override.yml"
        self.override.write_text(f"""\
services:
  open-webui:
    image: {STANDIN_IMAGE}
  moat:
    image: localhost/moat:test
networks:
  default:
    name: {self.network}
    external: true
""")
        self.env = dict(p.env, DOMAIN="localhost",
                        MOAT_HTTP_PUBLISH=f"127.0.0.1:{self.http_port}",
                        MOAT_HTTPS_PUBLISH=f"127.0.0.1:{self.https_port}")
        self.moat = f"{self.project}_moat_1"
        self.app = f"{self.project}_open-webui_1"
        self.ca = workdir / "ca.pem"

    def compose(self, *args, timeout=180):
        # podman-compose 1.0.3 exits 0 even when a podman command in it failed: callers
        # check the containers' state.
        return run(["podman-compose", "--podman-path", str(self.podman_path), "-p",
                    self.project, "-f", str(COMPOSE), "-f", str(self.override)] + list(args),
                   timeout=timeout, env=self.env)

    def state(self, name):
        cp = self.p("inspect", name, "--format", "{{.Id}} {{.State.Running}}", check=False)
        return cp.stdout.split() if cp.returncode == 0 else [None, "false"]

    def url(self, path="/"):
        return f"https://localhost:{self.https_port}{path}"

    def client(self, timeout=20):
        return httpx.Client(verify=str(self.ca), timeout=timeout, trust_env=False)

    def logs(self, name):
        cp = self.p("logs", name, check=False)
        return cp.stdout + cp.stderr

    def fingerprint(self):
        """SHA-256 of the certificate moat serves for localhost (SNI) on the published port."""
        ctx = ssl.create_default_context(cafile=str(self.ca))
        with socket.create_connection(("127.0.0.1", self.https_port), timeout=10) as s:
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                return hashlib.sha256(t.getpeercert(binary_form=True)).hexdigest()

    def wait_https(self, deadline_s=30):
        """Until moat answers 200 from the app through the published port; its CA first."""
        deadline = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < deadline:
            if not self.ca.exists():
                cp = self.p("exec", self.moat, "moat", "ca-root", check=False, timeout=30)
                if cp.returncode == 0 and "BEGIN CERTIFICATE" in cp.stdout:
                    self.ca.write_text(cp.stdout)
            if self.ca.exists():
                try:
                    with self.client(timeout=5) as c:
                        r = c.get(self.url("/health"))
                    if r.status_code == 200:
                        return r
                    last = f"{r.status_code} {r.text[:200]}"
                except (httpx.HTTPError, OSError) as e:
                    last = repr(e)
            time.sleep(0.2)
        raise AssertionError(f"no answer through moat: {last}\n--- moat:\n"
                             f"{self.logs(self.moat)[-3000:]}\n--- app:\n"
                             f"{self.logs(self.app)[-2000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    reason = skip_reason("podman-compose")
    if reason:
        pytest.skip(reason)
    p = podman_with_bases()
    moat_image(p)
    build_image(p, FIXTURES, FIXTURES / "standin.Dockerfile", STANDIN_IMAGE, timeout=600)
    s = Stack(p, tmp_path_factory.mktemp("compose"))
    p("network", "create", s.network)
    try:
        t0 = time.monotonic()
        up = s.compose("up", "-d", "--no-build")
        took = time.monotonic() - t0
        for name in (s.app, s.moat):
            assert s.state(name)[1] == "true", f"{name} is not running\n{up.stdout[-3000:]}"
        print(f"\ncompose up -d: {took:.1f} s")
        yield s
    finally:
        # Only what this module made: its project's containers (and their volumes), then
        # its network.
        ids = p("ps", "-aq", "--filter", f"label=io.podman.compose.project={s.project}",
                check=False).stdout.split()
        if ids:
            p("rm", "-f", "-v", "-t", "0", *ids, check=False, timeout=60)
        vols = p("volume", "ls", "-q", "--filter",
                 f"label=io.podman.compose.project={s.project}", check=False).stdout.split()
        if vols:
            p("volume", "rm", "-f", *vols, check=False)
        p("network", "rm", "-f", s.network, check=False)


def test_https_and_socketio_through_moat(stack):
    r = stack.wait_https()
    app_id = stack.state(stack.app)[0]
    assert r.json()["status"] is True and app_id.startswith(r.headers["x-standin"]), r.headers
    assert r.http_version == "HTTP/1.1"  # httpx without h2; moat offers both
    with stack.client() as c:
        cfg = c.get(stack.url("/api/config"))
    assert cfg.status_code == 200 and "standin" in cfg.json()["name"]
    # Plain HTTP is redirected to HTTPS.
    h = run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
             f"http://localhost:{stack.http_port}/x"], timeout=20).stdout
    assert h.startswith("308 https://localhost"), h

    import requests
    import socketio
    sess = requests.Session()
    sess.verify = str(stack.ca)
    sess.trust_env = False
    sio = socketio.Client(http_session=sess, reconnection=False)
    deltas = []
    sio.on("delta", lambda d: deltas.append(d))
    try:
        sio.connect(f"https://localhost:{stack.https_port}", socketio_path="/ws/socket.io",
                    transports=["websocket"], wait_timeout=10)
    except socketio.exceptions.ConnectionError as e:
        # Seen once in a full CI run and not reproduced alone (24 of 24): say what both
        # sides logged, so the next failure tells which side kept the namespace answer.
        pytest.fail(f"socket.io connect through moat failed: {e}\n--- moat:\n"
                    f"{stack.logs(stack.moat)[-3000:]}\n--- app:\n{stack.logs(stack.app)[-3000:]}")
    try:
        assert sio.transport() == "websocket"
        ack = sio.call("chat", {"n": 10, "gap": 0.02}, timeout=20)
    finally:
        sio.disconnect()
    assert ack == {"ok": True, "n": 10}
    assert [d["i"] for d in deltas] == list(range(10))


def test_moat_restarted_keeps_its_certificate(stack):
    stack.wait_https()
    before = stack.fingerprint()
    started = stack.p("inspect", stack.moat, "--format", "{{.State.StartedAt}}").stdout
    t0 = time.monotonic()
    stack.compose("restart", "moat")
    stack.wait_https()
    took = time.monotonic() - t0
    after = stack.fingerprint()
    assert stack.p("inspect", stack.moat, "--format", "{{.State.StartedAt}}").stdout != started
    logs = stack.logs(stack.moat)
    print(f"\nmoat restarted and serving again in {took:.1f} s; certificate sha256 "
          f"{before[:16]}... before, {after[:16]}... after")
    assert after == before, "moat issued a new certificate instead of using its volume's"
    assert logs.count(" ready with ") == 2, logs[-3000:]
    assert logs.count("issued a certificate for localhost") == 1, logs[-3000:]
    assert logs.count("created the internal CA") == 1, logs[-3000:]


def test_app_recreated_is_followed_by_name(stack):
    stack.wait_https()
    old_id = stack.state(stack.app)[0]
    old_ip = stack.p.ip(stack.app)

    # Requests keep coming through moat while the app is recreated (one at a time).
    seen, stop = [], threading.Event()

    def probe():
        with stack.client(timeout=30) as c:
            for _ in range(2000):  # bounded; stopped well before
                if stop.is_set():
                    return
                t = time.monotonic()
                try:
                    r = c.get(stack.url("/health"))
                    seen.append((t, time.monotonic(), r.status_code, r.headers.get("x-standin")))
                except httpx.HTTPError as e:
                    seen.append((t, time.monotonic(), repr(e), None))
                time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        t0 = time.monotonic()
        stack.compose("up", "-d", "--no-build", "--force-recreate", "open-webui")
        new_id, running = stack.state(stack.app)
        assert running == "true" and new_id != old_id, (old_id, new_id)
        new_ip = stack.p.ip(stack.app)

        # The new container is up when the app answers at its own address.
        up = None
        with httpx.Client(timeout=2, trust_env=False) as d:
            for _ in range(300):
                try:
                    if d.get(f"http://{new_ip}:8080/health").status_code == 200:
                        up = time.monotonic()
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        assert up is not None, f"the new app container never answered\n{stack.logs(stack.app)}"

        # From then on, new requests through moat: the first one the new container answers.
        served, tries = None, []
        with stack.client(timeout=15) as c:
            while time.monotonic() < up + 15:
                t = time.monotonic()
                try:
                    r = c.get(stack.url("/health"))
                    tries.append((round(t - up, 3), round(time.monotonic() - up, 3),
                                  r.status_code))
                    if r.status_code == 200 and new_id.startswith(r.headers["x-standin"]):
                        served = time.monotonic()
                        break
                except httpx.HTTPError as e:
                    tries.append((round(t - up, 3), round(time.monotonic() - up, 3), repr(e)))
                time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        prober.join(timeout=40)

    logs = stack.logs(stack.moat)
    moved = [ln for ln in logs.splitlines() if "now resolves to" in ln]
    during = [s for s in seen if s[0] >= t0 - 0.2]
    failed = [s for s in during if s[2] != 200]
    longest = max((b - a for a, b, _, _ in during), default=0)
    print(f"\napp recreated: {old_ip} -> {new_ip}; up {up - t0:.2f} s after compose began; "
          f"served through moat "
          f"{(served - up) if served else float('nan'):.2f} s after it was up "
          f"(requests from then: {tries}); "
          f"{len(during)} requests during the recreation, {len(failed)} failed, the longest "
          f"waited {longest:.2f} s; moat: {moved}")
    assert served is not None, f"not served by the new container: {tries}\n{logs[-3000:]}"
    events = "\n".join(ln for ln in logs.splitlines() if '"method"' not in ln)
    assert served - up <= FOLLOW_S, \
        f"served {served - up:.2f} s after the app was up: {tries}\n{events[-4000:]}"
    assert not failed, failed
    assert moved and new_ip in moved[-1], logs[-3000:]
