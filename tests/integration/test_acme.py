"""ACME against Debian's Pebble + pebble-challtestsrv, with real validation (never
PEBBLE_VA_ALWAYS_VALID): Pebble's HTTP-01 and TLS-ALPN-01 validators connect to moat's own
ports, and every name resolves to 127.0.0.1 through challtestsrv's DNS.

    /usr/bin/python3 -m pytest tests/integration/test_acme.py
"""

import json
import os
import re
import shutil
import socket
import sqlite3
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import MOAT_BIN, TARGET
from helpers import free_port, stop_process, tail, wait_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"

pytestmark = [
    pytest.mark.skipif(TARGET != "moat", reason="ACME is moat's own feature"),
    pytest.mark.skipif(not os.path.exists(PEBBLE), reason="pebble is not installed"),
]


def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


class Pebble:
    """Pebble and challtestsrv on free loopback ports, validating against http_port/tls_port."""

    def __init__(self, workdir, http_port, tls_port, validity=None, nonce_reject=0, env=None):
        self.dir = Path(workdir) / "pebble"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.tls_port = http_port, tls_port
        self.validity = validity
        self.nonce_reject = nonce_reject
        self.env = env or {}
        self.port = free_port()
        self.mgmt = free_port()
        self.dns = free_port()
        self.dns_mgmt = free_port()
        self.procs = []
        self._make_tls()

    def _make_tls(self):
        d = self.dir
        if (d / "ca.pem").exists():
            return
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key", cwd=d)
        _openssl("req", "-x509", "-new", "-key", "ca.key", "-subj", "/CN=pebble test ca",
                 "-days", "2", "-out", "ca.pem", cwd=d)
        _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "srv.key", cwd=d)
        (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        _openssl("req", "-new", "-key", "srv.key", "-subj", "/CN=localhost", "-out", "srv.csr",
                 cwd=d)
        _openssl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "srv.pem", cwd=d)

    @property
    def ca_pem(self):
        return str(self.dir / "ca.pem")

    @property
    def directory(self):
        return f"https://127.0.0.1:{self.port}/dir"

    def write_config(self):
        cfg = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt}",
            "certificate": str(self.dir / "srv.pem"),
            "privateKey": str(self.dir / "srv.key"),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }}
        if self.validity:
            cfg["pebble"]["certificateValidityPeriod"] = self.validity
        cfg["pebble"].update(getattr(self, "extra_cfg", {}))
        (self.dir / "pebble.json").write_text(json.dumps(cfg))

    def start(self):
        self.write_config()
        self.dns_log = open(self.dir / "challtestsrv.log", "ab")
        self.procs.append(subprocess.Popen(
            [CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns}", "-management",
             f"127.0.0.1:{self.dns_mgmt}", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=self.dns_log, stderr=subprocess.STDOUT))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                   PEBBLE_WFE_NONCEREJECT=str(self.nonce_reject), **self.env)
        self.log = open(self.dir / "pebble.log", "ab")
        self.procs.append(subprocess.Popen(
            [PEBBLE, "-config", str(self.dir / "pebble.json"), "-dnsserver",
             f"127.0.0.1:{self.dns}"], stdout=self.log, stderr=subprocess.STDOUT, env=env))
        assert wait_port(self.port, 15, self.procs[-1]), self.logs()
        assert wait_port(self.mgmt, 5, self.procs[-1]), self.logs()
        return self

    def stop(self):
        for p in reversed(self.procs):
            stop_process(p)
        self.procs = []

    def stop_pebble_only(self):
        stop_process(self.procs.pop())

    def restart_pebble(self):
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1",
                   PEBBLE_WFE_NONCEREJECT=str(self.nonce_reject), **self.env)
        self.procs.append(subprocess.Popen(
            [PEBBLE, "-config", str(self.dir / "pebble.json"), "-dnsserver",
             f"127.0.0.1:{self.dns}"], stdout=self.log, stderr=subprocess.STDOUT, env=env))
        assert wait_port(self.port, 15, self.procs[-1]), self.logs()
        assert wait_port(self.mgmt, 5, self.procs[-1]), self.logs()

    def _mgmt_get(self, path):
        ctx = ssl.create_default_context(cafile=self.ca_pem)
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt}{path}", context=ctx,
                                    timeout=10) as r:
            return r.read().decode()

    def roots(self, tmp):
        """Pebble's root and intermediate (new every run) as a CA file for verification."""
        p = Path(tmp) / "pebble-roots.pem"
        p.write_text(self._mgmt_get("/roots/0") + self._mgmt_get("/intermediates/0"))
        return str(p)

    def root_only(self, tmp):
        p = Path(tmp) / "pebble-root.pem"
        p.write_text(self._mgmt_get("/roots/0"))
        return str(p)

    def count(self, pattern):
        return len(re.findall(pattern, (self.dir / "pebble.log").read_text(errors="replace")))

    def logs(self):
        return tail(self.dir / "pebble.log") + "\n" + tail(self.dir / "challtestsrv.log")


class Moat:
    def __init__(self, workdir, pebble, sites, http_port, https_port, data=None, extra=()):
        self.dir = Path(workdir)
        self.pebble = pebble
        self.http_port, self.https_port = http_port, https_port
        self.data = data or str(self.dir / "data")
        self.cfg = self.dir / "Moatfile"
        self.cfg.write_text("".join(s + "\n" for s in sites))
        self.extra = list(extra)
        self.proc = None
        self.n = 0

    def start(self, log_name=None):
        self.n += 1
        self.log_path = self.dir / (log_name or f"moat-{self.n}.log")
        self.log = open(self.log_path, "ab")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [MOAT_BIN, "run", "--config", str(self.cfg), "--data", self.data, "--http-port",
             str(self.http_port), "--https-port", str(self.https_port), "--listen", "127.0.0.1",
             "--workers", "2", "--grace", "1", "--acme-ca", self.pebble.directory,
             "--acme-ca-root", self.pebble.ca_pem, "--email", "t@example.test",
             "--log-level", "debug", *self.extra],
            stdout=subprocess.DEVNULL, stderr=self.log)
        assert wait_port(self.https_port, 10, self.proc), self.logs()
        return self

    def stop(self):
        if self.proc:
            stop_process(self.proc)
            self.proc = None

    def logs(self):
        return tail(self.log_path, 20000) if self.n else ""


    def wait_log(self, pattern, timeout=30, count=1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(re.findall(pattern, self.log_path.read_text(errors="replace"))) >= count:
                return True
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        return False

    def db(self):
        return sqlite3.connect(os.path.join(self.data, "moat.db"))


def served_cert(port, name, cafile, timeout=5):
    """Handshake for `name` and verify the served chain against cafile; the peer cert (dict)."""
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with ctx.wrap_socket(s, server_hostname=name) as t:
            return t.getpeercert()


def wait_served(port, name, cafile, timeout=30):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            return served_cert(port, name, cafile)
        except (ssl.SSLError, OSError) as e:
            last = e
            time.sleep(0.05)
    raise AssertionError(f"no valid certificate for {name}: {last}")


@pytest.fixture
def ports():
    return free_port(), free_port()


@pytest.fixture
def env(tmp_path, ports, request):
    started = []

    def make(sites, validity=None, nonce_reject=0, pebble_http=None, pebble_tls=None,
             start_pebble=True, **kw):
        http_port, https_port = ports
        pb = Pebble(tmp_path, pebble_http or http_port, pebble_tls or https_port,
                    validity=validity, nonce_reject=nonce_reject)
        if start_pebble:
            pb.start()
        started.append(pb)
        m = Moat(tmp_path, pb, sites, http_port, https_port, **kw)
        started.append(m)
        return pb, m

    yield make
    rep = getattr(request.node, "rep_call", None)
    for s in reversed(started):
        if rep is not None and rep.failed:
            print(f"---- {type(s).__name__} logs ----\n{s.logs()}")
        s.stop()


def test_http01_issue_and_serve(env, tmp_path, upstream):
    pb, m = env([f"one.example.test {upstream.addr}"])
    m.start()
    # Pending until issued: the handshake for the public name is refused, not self-signed.
    cert = wait_served(m.https_port, "one.example.test", pb.roots(tmp_path))
    assert ("DNS", "one.example.test") in cert["subjectAltName"]
    assert m.wait_log(r"acme: issued a certificate for one\.example\.test .* via http-01")
    # The served chain verifies against Pebble's root alone (the intermediate is served).
    served_cert(m.https_port, "one.example.test", pb.root_only(tmp_path))
    rows = m.db().execute("select source, issuer from certs where id like 'acme:%'").fetchall()
    assert rows and rows[0][0] == "acme"


def test_pending_name_is_refused(env, tmp_path, upstream):
    # Pebble down: the certificate stays pending and handshakes for the name fail.
    pb, m = env([f"pending.example.test {upstream.addr}"], start_pebble=False)
    m.start()
    assert m.wait_log(r"certificate pending")
    with pytest.raises((ssl.SSLError, OSError)):
        served_cert(m.https_port, "pending.example.test", pb.ca_pem)
    assert m.wait_log(r"attempt 1 failed, next attempt in 60 s")
    # `moat certs` tells the operator what is pending, when it tries next and why it failed.
    r = subprocess.run([MOAT_BIN, "certs", "--data", m.data, "--config", str(m.cfg)],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith("pending: pending.example.test")]
    assert line, r.stdout
    assert "next attempt 20" in line[0] and "last error:" in line[0], line[0]


def test_tls_alpn01_when_http01_cannot_work(env, tmp_path, upstream):
    # Pebble validates HTTP-01 on a port nobody listens on: moat falls back to TLS-ALPN-01.
    pb, m = env([f"alpn.example.test {upstream.addr}"], pebble_http=free_port())
    m.start()
    wait_served(m.https_port, "alpn.example.test", pb.roots(tmp_path), timeout=40)
    assert m.wait_log(r"trying tls-alpn-01 instead")
    assert m.wait_log(r"issued a certificate for alpn\.example\.test .* via tls-alpn-01")
    # It remembers what works: the stored preference is tls-alpn-01.
    v = m.db().execute("select value from kv where key like 'acme-challenge:%'").fetchone()
    assert v[0] == "tls-alpn-01"


def test_multi_name_site_with_bad_nonces(env, tmp_path, upstream):
    pb, m = env([f"a.example.test,b.example.test,c.example.test {upstream.addr}"],
                nonce_reject=40)
    m.start()
    roots = pb.roots(tmp_path)
    for n in ("a.example.test", "b.example.test", "c.example.test"):
        cert = wait_served(m.https_port, n, roots)
        sans = {v for k, v in cert["subjectAltName"]}
        assert sans == {"a.example.test", "b.example.test", "c.example.test"}
    assert m.wait_log(r"issued a certificate for a\.example\.test,b\.example\.test")
    assert pb.count("badNonce") > 0 or m.wait_log(r"badNonce", timeout=1)


def test_restart_reuses_stored_certificate(env, tmp_path, upstream):
    pb, m = env([f"keep.example.test {upstream.addr}"])
    m.start()
    roots = pb.roots(tmp_path)
    first = wait_served(m.https_port, "keep.example.test", roots)
    assert m.wait_log(r"issued a certificate")
    m.stop()
    orders = len(re.findall(r"order .* placed", m.logs()))
    m.start()
    again = served_cert(m.https_port, "keep.example.test", roots)
    assert again["serialNumber"] == first["serialNumber"]
    time.sleep(1.0)  # an observation window: a needless order would be placed within ms
    assert "order" not in m.logs() or len(re.findall(r"order .* placed", m.logs())) == orders


def test_short_lifetime_renewed_and_hot_swapped(env, tmp_path, upstream):
    # 30 s certificates renew at 20 s; a connection held open keeps working meanwhile.
    pb, m = env([f"short.example.test {upstream.addr}"], validity=30)
    m.start()
    roots = pb.roots(tmp_path)
    first = wait_served(m.https_port, "short.example.test", roots)
    ctx = ssl.create_default_context(cafile=roots)
    held = ctx.wrap_socket(socket.create_connection(("127.0.0.1", m.https_port), timeout=10),
                           server_hostname="short.example.test")
    assert m.wait_log(r"renewed a certificate for short\.example\.test", timeout=45)
    second = served_cert(m.https_port, "short.example.test", roots)
    assert second["serialNumber"] != first["serialNumber"]
    held.sendall(b"GET / HTTP/1.1\r\nHost: short.example.test\r\n\r\n")
    assert held.recv(100).startswith(b"HTTP/1.1 ")
    held.close()
    assert m.proc.poll() is None


def test_ca_down_then_up_backs_off_and_recovers(env, tmp_path, upstream):
    pb, m = env([f"later.example.test {upstream.addr}"], start_pebble=False)
    m.start()
    assert m.wait_log(r"cannot reach the CA .* attempt 1 failed, next attempt in 60 s")
    row = m.db().execute("select value from kv where key like 'acme-backoff:%'").fetchone()
    assert row and row[0].startswith("1 ")
    pb.start()
    # The backoff is stored: a restart honours it instead of hammering the CA ...
    m.stop()
    m.start()
    assert m.wait_log(r"waiting after 1 failure\(s\)")
    # ... and `moat renew --force` skips it.
    r = subprocess.run([MOAT_BIN, "renew", "--data", m.data, "--force"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 0, r.stderr
    wait_served(m.https_port, "later.example.test", pb.roots(tmp_path))
    assert m.db().execute("select count(*) from kv where key like 'acme-backoff:%'").fetchone()[0] == 0


def test_two_processes_one_store_one_order(env, tmp_path, upstream):
    pb, m = env([f"shared.example.test {upstream.addr}"])
    # The second process shares the data dir and listens on other ports; Pebble validates
    # against the first one's ports, so only an order placed by the first can succeed.
    (tmp_path / "second").mkdir(exist_ok=True)
    m2 = Moat(tmp_path / "second", pb, [f"shared.example.test {upstream.addr}"], free_port(),
              free_port(), data=m.data)
    m.start()
    assert m.wait_log(r"order .* placed")
    m2.start()
    try:
        roots = pb.roots(tmp_path)
        wait_served(m.https_port, "shared.example.test", roots)
        wait_served(m2.https_port, "shared.example.test", roots, timeout=15)
        placed = len(re.findall(r"order .* placed", m.logs() + m2.logs()))
        assert placed == 1, m.logs() + m2.logs()
    finally:
        m2.stop()


def test_second_process_answers_tokens_from_storage(env, tmp_path, upstream):
    # B shares A's data dir but serves another site, so it never orders shared2.example.test;
    # Pebble validates against B's ports only. A's order succeeds only if B answers the
    # token A stored (B's control thread copies tokens from storage into its worker tables).
    b_http, b_https = free_port(), free_port()
    pb, a = env([f"shared2.example.test {upstream.addr}"], pebble_http=b_http,
                pebble_tls=b_https)
    (tmp_path / "b").mkdir(exist_ok=True)
    b = Moat(tmp_path / "b", pb, [f"localhost {upstream.addr}"], b_http, b_https, data=a.data)
    b.start()
    try:
        a.start()
        wait_served(a.https_port, "shared2.example.test", pb.roots(tmp_path), timeout=40)
        assert a.wait_log(r"issued a certificate for shared2\.example\.test .* via http-01"), \
            a.logs()
        assert b.wait_log(r"answering acme-token:\S+ placed by another instance", timeout=5)
        assert not re.search(r"order .* placed", b.logs())
        # The order withdrew its token from storage when it ended.
        left = a.db().execute("select count(*) from kv where key like 'acme-token%'").fetchone()
        assert left[0] == 0
    finally:
        b.stop()


def test_preferred_chain_picks_alternate(env, tmp_path, upstream):
    pb, m = env([], start_pebble=False)
    pb.env = {"PEBBLE_ALTERNATE_ROOTS": "1"}
    pb.start()
    alt_root = pb._mgmt_get("/roots/1")
    p = tmp_path / "alt-root.pem"
    p.write_text(alt_root)
    cn = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "multiline",
                         "-in", str(p)], capture_output=True, text=True).stdout
    cn = re.search(r"commonName\s*=\s*(.+)", cn).group(1).strip()
    m.cfg.write_text(f'pref.example.test {upstream.addr} preferred_chain="{cn}"\n')
    m.start()
    # Only the alternate root verifies the chain moat chose.
    wait_served(m.https_port, "pref.example.test", str(p))
    with pytest.raises(ssl.SSLError):
        served_cert(m.https_port, "pref.example.test", pb.root_only(tmp_path))


def test_external_account_binding(env, tmp_path, upstream):
    key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    pb, m = env([f"eab.example.test {upstream.addr} eab_kid=kid-1 eab_hmac={key}"],
                start_pebble=False)
    pb.extra_cfg = {"externalAccountBindingRequired": True,
                    "externalAccountMACKeys": {"kid-1": key}}
    pb.start()
    m.start()
    wait_served(m.https_port, "eab.example.test", pb.roots(tmp_path))


def test_lock_left_by_a_killed_process_is_taken_over_at_once(env, tmp_path, upstream):
    # A moat killed in the middle of an order leaves its issuing lock behind for 2 minutes.
    # Restarted at once on the same host, moat must see that the lock's owner is gone and
    # issue now, not wait for the lock to run out. The killed process is simulated by a lock
    # row naming this host and a pid that does not exist.
    pb, m = env([f"killed.example.test {upstream.addr}"], start_pebble=False)
    m.start()  # creates the store; the CA is down, so nothing is issued yet
    m.stop()
    host = socket.gethostname()[:40]
    pid = 4_000_000  # above pid_max: certainly no process
    with m.db() as db:
        # The issuing lock is a lease row (storage schema 2), running for 2 more minutes.
        db.execute("delete from kv where key like 'acme-backoff:%'")
        db.execute("insert or replace into leases values (?, ?, 7, unixepoch() + 120)",
                   ("acme:killed.example.test", f"{host}/{pid}/0badc0de"))
    pb.start()
    t0 = time.monotonic()
    m.start()
    cert = wait_served(m.https_port, "killed.example.test", pb.roots(tmp_path), timeout=20)
    took = time.monotonic() - t0
    print(f"\nissued {took:.1f} s after the restart")
    assert ("DNS", "killed.example.test") in cert["subjectAltName"]
    assert "another moat process is issuing it" not in m.logs()


def test_killed_mid_order_restarts_at_once_and_continues_the_same_order(env, tmp_path, upstream):
    # SIGKILL while an order is under way, then start again: ready within 1 s, the store
    # intact, the same internal CA, and the order the killed process placed continued (no
    # second order). A peer process on the same store (serving another site) makes the order
    # wait MOAT_ACMESHARE_PROPAGATION_MS between storing its token and telling the CA: the
    # kill lands in that window, while the order is certainly pending.
    pb, m = env([f"killed2.example.test {upstream.addr}", f"localhost {upstream.addr}"])
    (tmp_path / "peer").mkdir(exist_ok=True)
    peer = Moat(tmp_path / "peer", pb, [f"localhost {upstream.addr}"], free_port(), free_port(),
                data=m.data)
    peer.start()
    try:
        m.start()
        assert m.wait_log(r"order \S+ placed", timeout=20), m.logs()
        m.proc.kill()
        m.proc.wait(5)
        assert "issued a certificate for killed2" not in m.logs()  # killed before the end
        placed = re.search(r"order (\S+) placed", m.logs()).group(1)
        ca_root = subprocess.run([MOAT_BIN, "ca-root", "--data", m.data], capture_output=True,
                                 text=True, timeout=10).stdout
        with m.db() as db:
            assert db.execute("pragma integrity_check").fetchone()[0] == "ok"

        t0 = time.monotonic()
        m.start()  # waits for the HTTPS port
        ready = time.monotonic() - t0
        cert = wait_served(m.https_port, "killed2.example.test", pb.roots(tmp_path), timeout=30)
        print(f"\nready {ready:.2f} s after the restart; issued "
              f"{time.monotonic() - t0:.1f} s after it")
        assert ready < 1.0
        assert ("DNS", "killed2.example.test") in cert["subjectAltName"]
        assert f"continuing order {placed}" in m.logs(), m.logs()
        assert not re.search(r"order \S+ placed", m.logs()), m.logs()
        assert subprocess.run([MOAT_BIN, "ca-root", "--data", m.data], capture_output=True,
                              text=True, timeout=10).stdout == ca_root
        with m.db() as db:
            left = db.execute("select count(*) from kv where key like 'acme-order:%'").fetchone()
        assert left[0] == 0  # the order is over: nothing to continue after the next restart
    finally:
        peer.stop()
