"""Part 8 (1): upstreams follow DNS. A recreated container comes back at a new address under
the same name; moat must serve it again within 2 s of the name pointing there, without a
reload, log the change once, and keep the last good address while lookups fail.

Without containers the same is shown with a private mount namespace: the proxy runs under
`unshare --mount` with a test-owned hosts file bind-mounted on /etc/hosts (and a resolv.conf
naming 127.0.0.1, so no lookup ever leaves loopback); the app moves from 127.0.0.2 to
127.0.0.3, same port, and the hosts file is rewritten in place (same inode: the bind mount
keeps pointing at it, and glibc reads /etc/hosts again on every lookup). The host's own
/etc/hosts is never touched.

MOAT_TEST_TARGET=nginx runs the first test against nginx in the same namespace (it resolves
upstream names once, at start, and fails it).
"""

import threading
import time

import httpx
import pytest

from conftest import TARGET, MoatProxy, NginxProxy, _teardown, require_moat
from helpers import free_port
from owui_util import Standin, figure


def write_hosts(path, app_ip):
    """The test's hosts file: app.test at app_ip (None: no such name). Rewritten in place."""
    text = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
    if app_ip:
        text += f"{app_ip} app.test\n"
    mode = "r+" if path.exists() else "w"
    with open(path, mode) as f:
        f.write(text)
        f.truncate()


def _in_namespace(cls):
    class InNamespace(cls):
        def __init__(self, *a, etc, **kw):
            super().__init__(*a, **kw)
            self.etc = etc

        def argv(self):
            # unshare execs sh, which execs the proxy: one process, whose pid is the proxy's.
            script = ('mount --bind "$0/hosts" /etc/hosts && '
                      'mount --bind "$0/resolv.conf" /etc/resolv.conf && exec "$@"')
            return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                    str(self.etc), *super().argv()]

    return InNamespace


@pytest.fixture
def etc(tmp_path):
    d = tmp_path / "etc"
    d.mkdir()
    write_hosts(d / "hosts", "127.0.0.2")
    (d / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # loopback only
    return d


@pytest.fixture
def nsproxy(tmp_path, request, etc):
    """Factory: nsproxy(upstream_addr, site_opts=()) -> moat (or nginx) in the namespace."""
    if TARGET == "moat":
        require_moat()
    started = []

    def make(upstream_addr, site_opts=()):
        d = tmp_path / f"{TARGET}{len(started)}"
        if TARGET == "nginx":
            p = _in_namespace(NginxProxy)(d, upstream_addr, request.getfixturevalue("test_ca"),
                                          etc=etc)
        else:
            p = _in_namespace(MoatProxy)(d, upstream_addr, site_opts=site_opts, etc=etc)
        started.append(p)
        return p.start()

    yield make
    _teardown(request, started)


@pytest.fixture
def apps(tmp_path):
    made = []

    def make(name, port, host):
        s = Standin(tmp_path, name, port=port, host=host)
        made.append(s)
        return s.start()

    yield make
    for s in made:
        s.stop()


def _log(p):
    try:
        return p.stderr_path.read_text(errors="replace")
    except OSError:
        return ""


def test_moved_app_is_served_again_within_2s(nsproxy, apps, etc):
    port = free_port()
    old = apps("old", port, "127.0.0.2")
    p = nsproxy(f"app.test:{port}")
    with p.client() as c:
        r = c.get(p.url("/health"))
        assert r.status_code == 200 and r.headers["x-standin"] == "old"

    # The container is recreated: gone from .2, then up at .3; a client keeps asking all the
    # while (each request may wait inside the proxy).
    old.stop()
    results = []
    stop = threading.Event()

    def client():
        with p.client(timeout=15) as c:
            while not stop.is_set():
                try:
                    r = c.get(p.url("/health"))
                    results.append((time.monotonic(), r.status_code, r.headers.get("x-standin")))
                    ok = r.status_code == 200
                except httpx.HTTPError as e:
                    results.append((time.monotonic(), repr(e), None))
                    ok = False
                if not ok:
                    time.sleep(0.05)  # a proxy that answers errors at once: do not spin

    th = threading.Thread(target=client)
    th.start()
    try:
        apps("new", port, "127.0.0.3")
        write_hosts(etc / "hosts", "127.0.0.3")
        t_moved = time.monotonic()
        deadline = t_moved + 10
        while time.monotonic() < deadline and \
                not any(t >= t_moved and who == "new" for t, _, who in results):
            time.sleep(0.02)
    finally:
        stop.set()
        th.join(20)
    served = [t for t, st, who in results if t >= t_moved and st == 200 and who == "new"]
    took = served[0] - t_moved if served else None
    figure("moved app served again after (s)", round(took, 3) if took is not None else None)
    assert took is not None, f"the moved app was never served: {results[-5:]}"
    assert took < 2.0, f"served again only {took:.2f} s after the name moved"
    if TARGET == "moat":
        log = _log(p)
        line = f"upstream app.test:{port} now resolves to 127.0.0.3 (was 127.0.0.2)"
        assert log.count(line) == 1, f"the change must be logged once:\n{log[-3000:]}"
        assert f"app.test:{port} (dialled 127.0.0.2:{port}) refused the connection" in log, \
            f"the error line must name the address dialled:\n{log[-3000:]}"


@pytest.mark.moat_only
def test_interval_follows_the_name_and_keeps_the_last_good_answer(nsproxy, apps, etc):
    port = free_port()
    apps("old", port, "127.0.0.2")
    apps("new", port, "127.0.0.3")  # both up: only the lookup can move the traffic
    p = nsproxy(f"app.test:{port}", site_opts=["resolve_interval=300ms"])
    with p.client() as c:
        assert c.get(p.url("/health")).headers["x-standin"] == "old"
        write_hosts(etc / "hosts", "127.0.0.3")
        line = f"upstream app.test:{port} now resolves to 127.0.0.3 (was 127.0.0.2)"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and line not in _log(p):
            time.sleep(0.05)
        assert line in _log(p), "resolve_interval did not pick the change up"
        # New requests go to the new address (each worker takes the new snapshot between two
        # events, so the very next request may still be on its way), not over the pooled
        # connection to the old one.
        who = None
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and who != "new":
            who = c.get(p.url("/health")).headers["x-standin"]
        assert who == "new"

        # The name stops resolving: the last good address stays, and that is said once.
        write_hosts(etc / "hosts", None)
        warn = f"upstream app.test:{port}: cannot look the name up again"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and warn not in _log(p):
            time.sleep(0.05)
        assert warn in _log(p), _log(p)[-3000:]
        # Let several more lookups fail (no condition can show an absence sooner).
        time.sleep(1.0)
        r = c.get(p.url("/health"))
        assert r.status_code == 200 and r.headers["x-standin"] == "new"
        assert _log(p).count(warn) == 1, _log(p)[-3000:]
