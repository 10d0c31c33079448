"""Several moat instances on one PostgreSQL store (--storage postgres://...).

A PostgreSQL 15 of the test's own (tests/fixtures/pgserver.sh: TLS on, SCRAM-SHA-256 only,
loopback) and Pebble with real validation; three moat instances on 127.0.0.2, 127.0.0.3 and
127.0.0.4 with the same ports and the same store. Pebble's DNS sends every name to 127.0.0.3,
so the validator reaches whichever instance that is, not necessarily the one that placed the
order: the instances answer each other's challenges through the store.

    MOAT_BIN=$PWD/build/moat /usr/bin/python3 -m pytest -q tests/integration/test_storage_postgres.py
"""

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import MOAT_BIN, TARGET
from helpers import REPO, free_port, stop_process, tail
from test_acme import PEBBLE, Pebble

PGSERVER = REPO / "tests" / "fixtures" / "pgserver.sh"
PGBIN = "/usr/lib/postgresql/15/bin"
ADDRS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

pytestmark = [
    pytest.mark.skipif(TARGET != "moat", reason="moat's own storage"),
    pytest.mark.skipif(not os.path.exists(PEBBLE), reason="pebble is not installed"),
    pytest.mark.skipif(not os.path.exists(f"{PGBIN}/postgres"),
                       reason="PostgreSQL 15 is not installed"),
]


def pg(*args, check=True):
    r = subprocess.run([str(PGSERVER), *args], capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


class PgServer:
    def __init__(self):
        # Not under pytest's tmp_path: as root the server runs as "postgres", which cannot
        # enter pytest's 0700 folders.
        self.dir = Path(tempfile.mkdtemp(prefix="moat-pg-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()

    def start(self):
        pg("start", str(self.dir), str(self.port))
        return self

    def url(self):
        return (f"postgres://moat@127.0.0.1:{self.port}/moat?sslmode=verify-full"
                f"&sslrootcert={self.dir}/ca.pem")

    def sql(self, q):
        return pg("psql", str(self.dir), q).stdout.strip()

    def stop(self):
        pg("stop", str(self.dir), check=False)

    def remove(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def logs(self):
        return tail(self.dir / "log")


class Instance:
    """One moat on addr; its own data folder (pid, status), the shared store."""

    def __init__(self, workdir, addr, pebble, store, sites, http_port, https_port, key=None):
        self.dir = Path(workdir) / addr
        self.dir.mkdir(parents=True, exist_ok=True)
        self.addr = addr
        self.pebble = pebble
        self.store = store
        self.http_port, self.https_port = http_port, https_port
        self.cfg = self.dir / "Moatfile"
        self.cfg.write_text("".join(s + "\n" for s in sites))
        self.proc = None
        self.key = key
        self.log_path = self.dir / "moat.log"

    def start(self, **extra_env):
        self.log = open(self.log_path, "ab")
        env = dict(os.environ, MOAT_STORAGE_PASSWORD="moat-test-pw", **extra_env)
        self.proc = subprocess.Popen(
            [MOAT_BIN, "run", "--config", str(self.cfg), "--data", str(self.dir / "data"),
             "--storage", self.store, "--http-port", str(self.http_port), "--https-port",
             str(self.https_port), "--listen", self.addr, "--workers", "1", "--grace", "1",
             "--acme-ca", self.pebble.directory, "--acme-ca-root", self.pebble.ca_pem,
             "--email", "t@example.test", "--log-level", "debug",
             *(["--storage-key", str(self.key)] if self.key else [])],
            stdout=subprocess.DEVNULL, stderr=self.log, env=env)
        return self

    def wait_up(self, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.logs()
            try:
                socket.create_connection((self.addr, self.https_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"{self.addr} did not listen\n{self.logs()}")

    def text(self):
        return self.log_path.read_text(errors="replace")

    def count(self, pattern):
        return len(re.findall(pattern, self.text()))

    def wait_log(self, pattern, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()):
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        if self.proc:
            stop_process(self.proc)
            self.proc = None

    def logs(self):
        return f"== {self.addr}\n" + tail(self.log_path, 12000)


def served(addr, port, name, cafile, timeout=3):
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((addr, port), timeout=timeout) as s:
        with ctx.wrap_socket(s, server_hostname=name) as t:
            return t.getpeercert()


def wait_served(addr, port, name, cafile, timeout=40):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return served(addr, port, name, cafile)
        except (ssl.SSLError, OSError) as e:
            last = e
            time.sleep(0.05)
    raise AssertionError(f"{addr}: no valid certificate for {name}: {last}")


def point_dns(pb, addr):
    """Every name Pebble looks up resolves to addr from now on."""
    req = urllib.request.Request(f"http://127.0.0.1:{pb.dns_mgmt}/set-default-ipv4",
                                 data=json.dumps({"ip": addr}).encode(), method="POST")
    urllib.request.urlopen(req, timeout=5).read()


@pytest.fixture
def cluster(tmp_path, request, upstream):
    """PostgreSQL, Pebble (names resolve to 127.0.0.3) and three moat instances, not started."""
    started = []
    http_port, https_port = free_port(), free_port()
    db = PgServer()
    request.addfinalizer(db.remove)
    db.start()
    started.append(db)
    pb = Pebble(tmp_path, http_port, https_port).start()
    started.append(pb)
    point_dns(pb, "127.0.0.3")
    sites = [f"shared.example.test {upstream.addr}"]
    # One storage key for all three, created by whichever starts first: private keys, settings
    # and the shared session-ticket keys are sealed in the database.
    key = tmp_path / "storage.key"
    insts = [Instance(tmp_path, a, pb, db.url(), sites, http_port, https_port, key)
             for a in ADDRS]
    started.extend(insts)
    yield db, pb, insts
    rep = getattr(request.node, "rep_call", None)
    for s in reversed(started):
        if rep is not None and rep.failed:
            print(f"---- {type(s).__name__} logs ----\n{s.logs()}")
        s.stop()


class _Resumed:
    def __init__(self, reused):
        self.session_reused = reused


def tls_session(m, ctx, session=None):
    """A request over TLS to instance m; the session (to resume elsewhere), or with `session`
    given an object saying whether it was resumed. One context for both: Python insists."""
    with socket.create_connection((m.addr, m.https_port), timeout=5) as s:
        with ctx.wrap_socket(s, server_hostname="shared.example.test", session=session) as t:
            t.sendall(b"GET / HTTP/1.1\r\nHost: shared.example.test\r\nConnection: close\r\n\r\n")
            while t.recv(65536):  # TLS 1.3 tickets arrive after the handshake
                pass
            return _Resumed(t.session_reused) if session is not None else t.session


def wait_health(m, ok, timeout=12):
    """Poll `moat health` for instance m until ok(stdout) holds (and it exits 0)."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        r = subprocess.run([MOAT_BIN, "health", "--data", str(m.dir / "data")],
                           capture_output=True, text=True, timeout=10)
        out = r.stdout
        if r.returncode == 0 and ok(out):
            return True
        time.sleep(0.2)
    print(f"{m.addr}: moat health said: {out}")
    return False


def renew_and_spread(insts, i, roots, old_serials):
    """Force a renewal on insts[i]; every other instance must serve the new certificate within
    2 s of it being stored. Returns the new serial."""
    r = subprocess.run([MOAT_BIN, "renew", "--force", "--data", str(insts[i].dir / "data")],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stdout + r.stderr
    renewer = insts[i]
    before = renewer.count(r"renewed a certificate for shared\.example\.test")
    deadline = time.monotonic() + 30
    while renewer.count(r"renewed a certificate for shared\.example\.test") == before:
        assert time.monotonic() < deadline, renewer.logs()
        time.sleep(0.02)
    t0 = time.monotonic()  # the renewal is stored: the log line follows the commit
    while True:  # the renewer itself swaps its snapshot right after logging
        new = served(renewer.addr, renewer.https_port, "shared.example.test", roots)
        new = new["serialNumber"]
        if new not in old_serials:
            break
        assert time.monotonic() - t0 < 5, f"{renewer.addr} still serves the old certificate"
        time.sleep(0.01)
    took = []
    for m in insts:
        if m is renewer:
            continue
        while True:
            c = served(m.addr, m.https_port, "shared.example.test", roots)
            if c["serialNumber"] == new:
                took.append(time.monotonic() - t0)
                break
            assert time.monotonic() - t0 < 5, f"{m.addr} still serves the old certificate"
            time.sleep(0.02)
    print(f"renewal on {renewer.addr} served by the others after "
          + ", ".join(f"{t:.2f} s" for t in took))
    assert max(took) < 2.0, took
    return new


def test_three_instances_one_order_then_outage(cluster, tmp_path):
    db, pb, insts = cluster
    t0 = time.monotonic()
    for m in insts:
        m.start()
    for m in insts:
        m.wait_up()
    roots = pb.roots(tmp_path)
    certs = [wait_served(m.addr, m.https_port, "shared.example.test", roots) for m in insts]
    first = time.monotonic() - t0
    serials = {c["serialNumber"] for c in certs}
    assert len(serials) == 1, serials
    print(f"three instances: first certificate served by all three after {first:.1f} s")

    # Exactly one order, by one instance; the schema was created once.
    time.sleep(1.0)  # an observation window: a second order would be placed within it
    placed = sum(m.count(r"order .* placed") for m in insts)
    issued = sum(m.count(r"issued a certificate for shared\.example\.test") for m in insts)
    migrations = sum(m.count(r"schema moat in database moat .* upgraded") for m in insts)
    assert (placed, issued, migrations) == (1, 1, 1), (placed, issued, migrations)
    assert db.sql("SELECT count(*) FROM moat.certs WHERE id LIKE 'acme:%'") == "1"
    assert db.sql("SELECT version FROM moat.schema_version") == "2"

    # `moat certs` reads the shared store.
    env = dict(os.environ, MOAT_STORAGE_PASSWORD="moat-test-pw")
    r = subprocess.run([MOAT_BIN, "certs", "--storage", db.url(), "--storage-key",
                        str(tmp_path / "storage.key"), "--data", str(tmp_path / "certs-cli")],
                       capture_output=True, text=True, timeout=15, env=env)
    assert r.returncode == 0, r.stderr
    assert "shared.example.test" in r.stdout, r.stdout

    # Sealed at rest, and a TLS session made with one instance resumes on the others (shared
    # session-ticket keys).
    assert db.sql("SELECT count(*) FROM moat.certs WHERE key_pem NOT LIKE 'moat-enc:v1:%'") == "0"
    assert db.sql("SELECT count(*) FROM moat.kv WHERE value NOT LIKE 'moat-enc:v1:%'") == "0"
    ctx = ssl.create_default_context(cafile=roots)
    sess = tls_session(insts[0], ctx)
    for m in insts[1:]:
        assert tls_session(m, ctx, sess).session_reused is True, m.addr

    # A peer's renewal reaches every instance within 2 s (NOTIFY on commit, LISTEN on the loop).
    serial = renew_and_spread(insts, 0, roots, serials)
    serials.add(serial)

    # The database goes away: every instance keeps serving from memory and says so once.
    db.stop()
    time.sleep(3.0)
    for m in insts:
        assert served(m.addr, m.https_port, "shared.example.test", roots)["serialNumber"] in serials
        assert m.proc.poll() is None, m.logs()
    for m in insts:
        assert m.wait_log(r"keeps serving what it has in memory", timeout=10), m.logs()
        assert m.count(r"keeps serving what it has in memory and tries again") == 1, m.logs()
    # `moat health` still says healthy (it serves), and what it serves without.
    for m in insts:
        assert wait_health(m, lambda out: "degraded: storage:" in out), m.logs()

    # Back: each reconnects on its own (backoff) and carries on with the same certificate.
    pg("resume", str(db.dir))
    for m in insts:
        assert m.wait_log(r"PostgreSQL at 127\.0\.0\.1:\d+ is reachable again", timeout=40), \
            m.logs()
    for m in insts:
        c = served(m.addr, m.https_port, "shared.example.test", roots)
        assert c["serialNumber"] in serials
    # ... and watches the store again, after reading it afresh; news flows as before.
    for m in insts:
        assert m.wait_log(r"watching the shared store again", timeout=15), m.logs()
        assert wait_health(m, lambda out: "degraded" not in out), m.logs()
    renew_and_spread(insts, 2, roots, serials)
    assert sum(m.count(r"order .* placed") for m in insts) == 3


def test_paused_lock_holder_is_fenced_out(cluster, tmp_path):
    """The instance holding the issuing lock is stopped (SIGSTOP) past its lease: another takes
    the lock over and stores its certificate; when the first resumes and finishes its order, its
    write is refused, and every instance serves the certificate that was stored."""
    db, pb, insts = cluster
    for m in insts:
        m.start(MOAT_ACME_LOCK_TTL="3")  # heartbeat every 0.75 s
    for m in insts:
        m.wait_up()
    # The order placer waits 2 s for its peers to see the token before the CA validates:
    # stop it inside that window.
    holder = None
    deadline = time.monotonic() + 20
    while holder is None and time.monotonic() < deadline:
        holder = next((m for m in insts if m.count(r"order .* placed")), None)
        time.sleep(0.01)
    assert holder is not None, "\n".join(m.logs() for m in insts)
    os.kill(holder.proc.pid, signal.SIGSTOP)
    try:
        others = [m for m in insts if m is not holder]
        point_dns(pb, others[0].addr)  # the validator must reach a running instance
        roots = pb.roots(tmp_path)
        certs = [wait_served(m.addr, m.https_port, "shared.example.test", roots, timeout=30)
                 for m in others]
        assert len({c["serialNumber"] for c in certs}) == 1
        taker = [m for m in others if m.count(r"issued a certificate for shared\.example\.test")]
        assert len(taker) == 1, "\n".join(m.logs() for m in insts)
        stored = db.sql("SELECT not_after FROM moat.certs WHERE id = 'acme:shared.example.test'")
    finally:
        os.kill(holder.proc.pid, signal.SIGCONT)
    # Resumed: it notices the lease is gone or its fenced write is refused; either way it
    # stores nothing and serves the stored certificate.
    assert holder.wait_log(r"took the issuing lock over|the certificate just issued is not "
                           r"stored", timeout=20), holder.logs()
    time.sleep(1.0)
    assert db.sql("SELECT not_after FROM moat.certs WHERE id = 'acme:shared.example.test'") \
        == stored
    assert holder.count(r"issued a certificate for shared\.example\.test") == 0, holder.logs()
    c = wait_served(holder.addr, holder.https_port, "shared.example.test", roots, timeout=10)
    assert c["serialNumber"] == certs[0]["serialNumber"]


def test_killed_order_placer_is_followed_and_a_peer_answers_the_ca(cluster, tmp_path):
    """The instance that placed the first order is killed (SIGKILL) before it told the CA.
    Another instance takes the issuing lock over at once (the holder's process is gone) and
    continues the same order rather than placing a second one; the CA's validator is sent to
    the third instance, which answers the token the second one published."""
    db, pb, insts = cluster
    for m in insts:
        m.start()
    for m in insts:
        m.wait_up()
    placer = None
    deadline = time.monotonic() + 20
    while placer is None and time.monotonic() < deadline:
        placer = next((m for m in insts if m.count(r"order \S+ placed")), None)
        time.sleep(0.01)
    assert placer is not None, "\n".join(m.logs() for m in insts)
    # Inside the 2 s the placer gives its peers to see the token: the CA has not been told.
    placer.proc.kill()
    placer.proc.wait(5)
    url = re.search(r"order (\S+) placed", placer.text()).group(1)
    others = [m for m in insts if m is not placer]
    follower = None
    deadline = time.monotonic() + 20
    while follower is None and time.monotonic() < deadline:
        follower = next((m for m in others if m.count(r"continuing order|order \S+ placed")),
                        None)
        time.sleep(0.01)
    assert follower is not None, "\n".join(m.logs() for m in insts)
    answerer = next(m for m in others if m is not follower)
    point_dns(pb, answerer.addr)  # within the follower's 2 s: the validator reaches the other
    roots = pb.roots(tmp_path)
    certs = [wait_served(m.addr, m.https_port, "shared.example.test", roots, timeout=30)
             for m in others]
    assert len({c["serialNumber"] for c in certs}) == 1
    assert f"continuing order {url}" in follower.text(), follower.logs()
    assert sum(m.count(r"order \S+ placed") for m in insts) == 1, \
        "\n".join(m.logs() for m in insts)
    assert follower.count(r"issued a certificate for shared\.example\.test") == 1
    assert answerer.count(r"issued a certificate for shared\.example\.test") == 0
    assert answerer.wait_log(r"answering acme-token:\S+ placed by another instance", timeout=5), \
        answerer.logs()

    # The connections the instances LISTEN on are killed on the server side: they notice,
    # read the store afresh, LISTEN again, and a renewal still reaches the other within 2 s.
    killed = db.sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%'")
    assert killed == "2", killed
    for m in others:
        assert m.wait_log(r"watching the shared store again", timeout=15), m.logs()
    renew_and_spread(others, 0, roots, {c["serialNumber"] for c in certs})


def test_storage_copy_and_sealed_keys(tmp_path):
    """`moat storage copy` moves a SQLite store to PostgreSQL, sealing private keys with
    --storage-key; repeating it changes nothing; the copy serves `moat ca-root`."""
    db = PgServer()
    try:
        db.start()
        env = dict(os.environ, MOAT_STORAGE_PASSWORD="moat-test-pw")
        data = tmp_path / "data"
        key = tmp_path / "storage.key"

        def moat(*args):
            r = subprocess.run([MOAT_BIN, *args], capture_output=True, text=True, timeout=20,
                               env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            return r.stdout

        root = moat("ca-root", "--data", str(data))  # creates the internal CA in SQLite
        out = moat("storage", "copy", "--from", f"sqlite:{data}", "--to", db.url(),
                   "--storage-key", str(key), "--data", str(data))
        assert "copied 2 certificate(s)" in out, out
        assert (key.stat().st_mode & 0o777) == 0o600
        out = moat("storage", "copy", "--from", f"sqlite:{data}", "--to", db.url(),
                   "--storage-key", str(key), "--data", str(data))
        assert "copied 0 certificate(s) and 0 setting(s); 2 certificate(s)" in out, out
        assert db.sql("SELECT count(*) FROM moat.certs WHERE key_pem LIKE 'moat-enc:v1:%'") == "2"
        assert db.sql("SELECT count(*) FROM moat.certs WHERE key_pem LIKE '%PRIVATE KEY%'") == "0"
        assert moat("ca-root", "--storage", db.url(), "--storage-key", str(key),
                    "--data", str(tmp_path / "other")) == root
        # Without the key the sealed private keys do not open: a sentence, not garbage.
        r = subprocess.run([MOAT_BIN, "ca-root", "--storage", db.url(), "--storage-key",
                            str(tmp_path / "wrong.key"), "--data", str(tmp_path / "other")],
                           capture_output=True, text=True, timeout=20, env=env)
        assert r.returncode != 0 and "does not open with the key" in r.stderr, r.stderr
    finally:
        db.remove()
