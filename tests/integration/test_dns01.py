"""ACME DNS-01 with real servers: BIND 9 (named) authoritative for a test zone on a loopback
port, taking RFC 2136 updates signed with a TSIG key from tsig-keygen, and Pebble resolving
through it (-dnsserver), so Pebble's validation reads the TXT records moat put in the zone.

    MOAT_BIN=$PWD/build/moat /usr/bin/python3 -m pytest -q tests/integration/test_dns01.py
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import MOAT_BIN, TARGET
from helpers import FIXTURES, free_port, stop_process, tail
from test_acme import Moat, Pebble, PEBBLE, served_cert, wait_served

NAMED = shutil.which("named") or "/usr/sbin/named"
TSIG_KEYGEN = shutil.which("tsig-keygen") or "/usr/sbin/tsig-keygen"
DIG = shutil.which("dig") or "/usr/bin/dig"
ZONE = "dns01.test"

pytestmark = [
    pytest.mark.skipif(TARGET != "moat", reason="ACME is moat's own feature"),
    pytest.mark.skipif(not os.path.exists(PEBBLE), reason="pebble is not installed"),
    pytest.mark.skipif(not os.path.exists(NAMED), reason="bind9 (named) is not installed"),
    pytest.mark.skipif(not os.path.exists(TSIG_KEYGEN), reason="tsig-keygen is not installed"),
    pytest.mark.skipif(not os.path.exists(DIG), reason="dig (bind9-dnsutils) is not installed"),
]


class Bind:
    """named -g on 127.0.0.1:port, primary for ZONE, updates allowed for one TSIG key."""

    def __init__(self, workdir):
        self.dir = Path(workdir) / "bind"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.key_text = subprocess.run([TSIG_KEYGEN, "moat-test"], check=True,
                                       capture_output=True, text=True).stdout
        self.key_file = self.dir / "tsig.key"
        self.key_file.write_text(self.key_text)
        os.chmod(self.key_file, 0o600)
        self.proc = None
        self.extra_zone = ""
        # A second key the server knows but does not let update the zone.
        self.other_key_text = subprocess.run([TSIG_KEYGEN, "moat-other"], check=True,
                                             capture_output=True, text=True).stdout
        self.other_key_file = self.dir / "other.key"
        self.other_key_file.write_text(self.other_key_text)
        os.chmod(self.other_key_file, 0o600)

    def start(self):
        d = self.dir
        (d / f"{ZONE}.db").write_text(
            "$TTL 60\n"
            f"@ IN SOA ns1.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 60\n"
            f"@ IN NS ns1.{ZONE}.\n"
            "ns1 IN A 127.0.0.1\n"
            "@ IN A 127.0.0.1\n"
            "* IN A 127.0.0.1\n"
            "ai IN A 127.0.0.1\n"
            "*.ai IN A 127.0.0.1\n" + self.extra_zone)
        (d / "named.conf").write_text(
            "options {\n"
            f'  directory "{d}";\n'
            f'  pid-file "{d}/named.pid";\n'
            f'  session-keyfile "{d}/session.key";\n'
            f'  managed-keys-directory "{d}";\n'
            f"  listen-on port {self.port} {{ 127.0.0.1; }};\n"
            "  listen-on-v6 { none; };\n"
            "  recursion no;\n"
            "  dnssec-validation no;\n"
            "};\n"
            "controls { };\n"
            + self.key_text + self.other_key_text +
            f'zone "{ZONE}" {{ type primary; file "{d}/{ZONE}.db"; '
            'allow-update { key "moat-test"; }; };\n')
        self.log = open(d / "named.log", "ab")
        self.proc = subprocess.Popen([NAMED, "-g", "-c", str(d / "named.conf"), "-n", "1"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if "running" in (d / "named.log").read_text(errors="replace"):
                if self.dig(ZONE, "SOA"):
                    return self
            time.sleep(0.1)
        raise AssertionError("named did not start:\n" + self.logs())

    def dig(self, name, rtype="TXT"):
        cp = subprocess.run([DIG, "+short", "+time=2", "+tries=1", "-p", str(self.port),
                             "@127.0.0.1", name, rtype], capture_output=True, text=True,
                            timeout=10)
        return [line for line in cp.stdout.splitlines() if line.strip()]

    def txt(self):
        return self.dig(f"_acme-challenge.ai.{ZONE}")

    def stop(self):
        if self.proc:
            stop_process(self.proc)
            self.proc = None

    def logs(self):
        return tail(self.dir / "named.log")


class BindPebble(Pebble):
    """Pebble resolving through BIND (no challtestsrv): dns-01 validation reads the real zone."""

    def __init__(self, workdir, bind, http_port, tls_port):
        super().__init__(workdir, http_port, tls_port)
        self.bind = bind

    def _spawn(self):
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0")
        self.procs.append(subprocess.Popen(
            [PEBBLE, "-config", str(self.dir / "pebble.json"), "-dnsserver",
             f"127.0.0.1:{self.bind.port}"], stdout=self.log, stderr=subprocess.STDOUT,
            env=env))

    def start(self):
        from helpers import wait_port
        self.write_config()
        self.log = open(self.dir / "pebble.log", "ab")
        (self.dir / "challtestsrv.log").write_text("(not used: Pebble resolves through BIND)\n")
        self._spawn()
        assert wait_port(self.port, 15, self.procs[-1]), self.logs()
        assert wait_port(self.mgmt, 5, self.procs[-1]), self.logs()
        return self


@pytest.fixture
def rig(tmp_path, request):
    started = []

    def make(site_opts="", key_file=None, wait="20s", site=None, extra_zone="", more_sites=()):
        bind = Bind(tmp_path)
        bind.extra_zone = extra_zone
        bind.start()
        started.append(bind)
        http_port, https_port = free_port(), free_port()
        pb = BindPebble(tmp_path, bind, http_port, https_port).start()
        started.append(pb)
        key = key_file or bind.key_file
        up = request.getfixturevalue('upstream').addr
        if site is None:
            site = (f"*.ai.{ZONE},ai.{ZONE} {up} dns=rfc2136 "
                    f"dns_server=127.0.0.1:{bind.port} dns_tsig={key} "
                    f"dns_resolver=127.0.0.1:{bind.port} dns_wait={wait} {site_opts}")
        else:
            site = site(bind, up)
        m = Moat(tmp_path, pb, [site] + [f"{x} {up}" for x in more_sites], http_port, https_port)
        started.append(m)
        return bind, pb, m

    yield make
    rep = getattr(request.node, "rep_call", None)
    for s in reversed(started):
        if rep is not None and rep.failed:
            print(f"---- {type(s).__name__} logs ----\n{s.logs()}")
        s.stop()


def kv_rows(m, prefix):
    return m.db().execute("select key, value from kv where key like ?",
                          (prefix + "%",)).fetchall()


def wait_until(pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


def test_wildcard_and_base_over_rfc2136(rig, tmp_path):
    # A more specific line beside the wildcard: its own certificate (HTTP-01, Pebble resolving
    # it through BIND's *.ai record), and its own site.
    bind, pb, m = rig(more_sites=[f"chat.ai.{ZONE}"])
    t0 = time.monotonic()
    m.start()
    roots = pb.roots(tmp_path)
    cert = wait_served(m.https_port, f"a.ai.{ZONE}", roots, timeout=60)
    took = time.monotonic() - t0
    print(f"wildcard + base certificate served after {took:.2f} s")
    sans = cert["subjectAltName"]
    assert ("DNS", f"*.ai.{ZONE}") in sans and ("DNS", f"ai.{ZONE}") in sans
    # The same certificate for the base name and any other single label.
    served_cert(m.https_port, f"ai.{ZONE}", roots)
    served_cert(m.https_port, f"other-1.ai.{ZONE}", roots)
    assert m.wait_log(rf"acme: issued a certificate for \*\.ai\.{ZONE},ai\.{ZONE} .* via dns-01")
    # Two TXT values were made (one per authorization) and both deleted afterwards.
    assert m.wait_log(r"dns-01: added _acme-challenge\.ai\.dns01\.test TXT", count=2)
    assert m.wait_log(r"dns-01: deleted _acme-challenge\.ai\.dns01\.test TXT", count=2, timeout=15)
    # Both values were in the zone at once: the second added before the first deleted.
    log = m.log_path.read_text()
    added = [mt.start() for mt in re.finditer(r"dns-01: added _acme-challenge\.ai\.", log)]
    deleted = [mt.start() for mt in re.finditer(r"dns-01: deleted _acme-challenge\.ai\.", log)]
    assert added[1] < deleted[0]
    assert bind.txt() == []
    assert kv_rows(m, "dns01-record:") == []
    # HTTP -> HTTPS for a name only the wildcard covers, to that very name.
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", m.http_port, timeout=5)
    c.request("GET", "/x?y=1", headers={"Host": f"b.ai.{ZONE}"})
    r = c.getresponse()
    assert r.status == 308
    assert r.getheader("Location") == f"https://b.ai.{ZONE}:{m.https_port}/x?y=1"
    # The specific line wins over the wildcard for its name.
    chat = wait_served(m.https_port, f"chat.ai.{ZONE}", roots, timeout=60)
    assert chat["subjectAltName"] == (("DNS", f"chat.ai.{ZONE}"),)
    assert m.wait_log(rf"issued a certificate for chat\.ai\.{ZONE} .* via http-01")
    # Two labels below the wildcard: not covered, no certificate.
    with pytest.raises(Exception):
        served_cert(m.https_port, f"x.y.ai.{ZONE}", roots)
    # `moat certs` shows the certificate and the DNS-01 state of the name.
    out = subprocess.run([MOAT_BIN, "certs", "--data", m.data], capture_output=True,
                         text=True, timeout=20)
    assert f"*.ai.{ZONE}" in out.stdout, out.stdout + out.stderr
    assert re.search(rf"dns-01: ai\.{ZONE}: .*done: _acme-challenge\.ai\.{ZONE} TXT was published, then del",
                     out.stdout), out.stdout


def test_wrong_tsig_key_is_refused_and_leaves_nothing(rig, tmp_path):
    bad = tmp_path / "wrong.key"
    bad.write_text(subprocess.run([TSIG_KEYGEN, "moat-test"], check=True, capture_output=True,
                                  text=True).stdout)
    os.chmod(bad, 0o600)
    bind, pb, m = rig(key_file=bad)
    m.start()
    assert m.wait_log(r"refused the TSIG key \S*moat-test", timeout=30), m.logs()
    assert m.wait_log(r"BADSIG", timeout=1)
    # A clear failure with a backoff, never a retry storm.
    assert m.wait_log(r"attempt 1 failed, next attempt in \d+ s", timeout=10)
    assert bind.txt() == []
    assert kv_rows(m, "dns01-record:") == []
    state = dict(kv_rows(m, "dns01-state:"))
    assert any("refused the TSIG key" in v for v in state.values()), state
    m.stop()
    out = subprocess.run([MOAT_BIN, "certs", "--data", m.data, "--config", str(m.cfg)],
                         capture_output=True, text=True, timeout=20)
    assert re.search(rf"pending: \*\.ai\.{ZONE},ai\.{ZONE} .*last error: .*BADSIG", out.stdout), \
        out.stdout + out.stderr
    assert re.search(rf"dns-01: ai\.{ZONE}: .*failed: .*refused the TSIG key", out.stdout), \
        out.stdout
    # The secret never shows in the log.
    secret = re.search(r'secret "([^"]+)"', bad.read_text()).group(1)
    assert secret not in m.log_path.read_text()


def test_key_not_allowed_to_update_is_refused(rig, tmp_path):
    bind, pb, m = rig(site=lambda b, up: (
        f"*.ai.{ZONE},ai.{ZONE} {up} dns=rfc2136 dns_server=127.0.0.1:{b.port} "
        f"dns_tsig={b.other_key_file} dns_resolver=127.0.0.1:{b.port}"))
    m.start()
    # A signed REFUSED (the answer's own TSIG verified): the key is known, just not allowed.
    assert m.wait_log(r"refused to add _acme-challenge\.ai\.dns01\.test TXT in zone dns01\.test "
                      r"with key \S*moat-other\S*: REFUSED; the key may not change this name",
                      timeout=30), m.logs()
    assert m.wait_log(r"attempt 1 failed, next attempt in \d+ s", timeout=10)
    assert bind.txt() == []
    assert kv_rows(m, "dns01-record:") == []


def test_key_file_readable_by_others_is_refused(rig, tmp_path):
    loose = tmp_path / "loose.key"
    bind = None
    bind, pb, m = rig(key_file=loose)
    shutil.copy(bind.key_file, loose)
    os.chmod(loose, 0o644)
    m.start()
    assert m.wait_log(rf"can be read by other users \(mode 0644\); run 'chmod 600 {loose}'",
                      timeout=30), m.logs()
    assert bind.txt() == []


def test_truncated_answer_is_asked_again_over_tcp(rig, tmp_path):
    # Twenty other TXT values at the same name: the TXT answer moat asks for while waiting
    # for its record is over 512 bytes, so BIND truncates it over UDP and moat asks over TCP
    # and finds its value. Pebble 2.4's validator does not retry over TCP: it sees the part
    # of the answer that fit, which holds moat's value or not depending on the order BIND
    # rotates the set into. Either ending is fine here; the record must be deleted after both.
    # dns_server= is a name here, looked up (A) at dns_resolver=.
    filler = "".join(f'_acme-challenge.tc IN TXT "filler-{i:02d}-{"x" * 40}"\n'
                     for i in range(20))
    bind, pb, m = rig(site=lambda b, up: (
        f"tc.{ZONE} {up} dns=rfc2136 dns_server=ns1.{ZONE}:{b.port} dns_tsig={b.key_file} "
        f"dns_resolver=127.0.0.1:{b.port} dns_wait=20s"), extra_zone=filler)
    m.start()
    assert m.wait_log(r"was truncated; asking again over TCP"), m.logs()
    assert m.wait_log(r"dns-01: added _acme-challenge\.tc\.dns01\.test TXT .* through 127\.0\.0\.1:")
    assert m.wait_log(r"dns-01: _acme-challenge\.tc\.dns01\.test TXT is on all 1 authoritative")
    assert m.wait_log(r"dns-01 validation of tc\.dns01\.test failed: unauthorized|"
                      r"issued a certificate for tc\.dns01\.test", timeout=20), m.logs()
    assert m.wait_log(r"dns-01: deleted _acme-challenge\.tc\.dns01\.test TXT", timeout=15)
    assert len(bind.dig(f"_acme-challenge.tc.{ZONE}", "TXT")) == 20
    assert kv_rows(m, "dns01-record:") == []


def test_propagation_timeout_fails_and_deletes(rig, tmp_path):
    # A second authoritative server that never answers (nothing listens on 127.0.0.2): the
    # record never shows on all of them, the wait ends at dns_wait=, the order fails with a
    # sentence saying so, and the record is deleted.
    bind, pb, m = rig(wait="2s", extra_zone="@ IN NS ns2.dns01.test.\nns2 IN A 127.0.0.2\n")
    m.start()
    assert m.wait_log(r"waiting up to 2 s for _acme-challenge\.ai\.dns01\.test TXT to show on 2 "
                      r"authoritative server\(s\): ", timeout=30), m.logs()
    log = m.log_path.read_text()
    assert re.search(r"ns1\.dns01\.test \(127\.0\.0\.1:\d+\)", log)
    assert re.search(r"ns2\.dns01\.test \(127\.0\.0\.2:\d+\)", log)
    assert m.wait_log(r"did not show on all authoritative servers of dns01\.test within 2 s "
                      r"\(1 of 2 answer it\); raise dns_wait=", timeout=30), m.logs()
    assert m.wait_log(r"attempt 1 failed, next attempt in \d+ s", timeout=5)
    assert m.wait_log(r"dns-01: deleted _acme-challenge\.ai\.dns01\.test TXT", timeout=15)
    assert bind.txt() == []
    assert kv_rows(m, "dns01-record:") == []
    assert "POST /chalZ/" not in pb.logs()  # Pebble was never asked to validate


def test_cname_on_acme_challenge_is_followed(rig, tmp_path):
    # _acme-challenge.cn is a CNAME to a name kept for ACME: the record goes there, Pebble
    # follows the CNAME when it validates, and the record is deleted there afterwards.
    bind, pb, m = rig(site=lambda b, up: (
        f"cn.{ZONE} {up} dns=rfc2136 dns_server=127.0.0.1:{b.port} dns_tsig={b.key_file} "
        f"dns_resolver=127.0.0.1:{b.port} dns_wait=20s"),
        extra_zone=f"_acme-challenge.cn IN CNAME cn.acme-delegated.{ZONE}.\n")
    m.start()
    wait_served(m.https_port, f"cn.{ZONE}", pb.roots(tmp_path), timeout=60)
    assert m.wait_log(rf"dns-01: _acme-challenge\.cn\.{ZONE} is a CNAME to "
                      rf"cn\.acme-delegated\.{ZONE}; the record goes there")
    assert m.wait_log(rf"dns-01: added cn\.acme-delegated\.{ZONE} TXT")
    assert m.wait_log(rf"dns-01: deleted cn\.acme-delegated\.{ZONE} TXT", timeout=15)
    assert bind.dig(f"cn.acme-delegated.{ZONE}") == []
    assert bind.dig(f"_acme-challenge.cn.{ZONE}", "CNAME") == [f"cn.acme-delegated.{ZONE}."]
    assert kv_rows(m, "dns01-record:") == []


def test_ns_without_glue_is_looked_up(rig, tmp_path):
    # A second NS outside the zone (no glue; BIND refuses to answer for it): moat looks the NS
    # names up one by one, checks at the one it can reach, says which one it skips, and the
    # certificate is issued.
    bind, pb, m = rig(site=lambda b, up: (
        f"ng.{ZONE} {up} dns=rfc2136 dns_server=127.0.0.1:{b.port} dns_tsig={b.key_file} "
        f"dns_resolver=127.0.0.1:{b.port} dns_wait=20s"),
        extra_zone="@ IN NS ns.outside.test.\n")
    m.start()
    wait_served(m.https_port, f"ng.{ZONE}", pb.roots(tmp_path), timeout=60)
    assert m.wait_log(r"the authoritative server ns\.outside\.test of dns01\.test has no IPv4 "
                      r"address here; not checking it"), m.logs()
    assert m.wait_log(r"to show on 1 authoritative server\(s\): ns1\.dns01\.test \(127\.0\.0\.1:")
    assert m.wait_log(r"dns-01: deleted _acme-challenge\.ng\.dns01\.test TXT", timeout=15)


def test_restart_mid_order_leaves_no_stray_record(rig, tmp_path):
    bind, pb, m = rig(wait="20s")
    # A resolver nobody answers: the record goes in, then the NS lookup takes its ~4.5 s of
    # timeouts before moat checks at the primary: the window in which moat is killed.
    dead = free_port()
    m.cfg.write_text(m.cfg.read_text().replace(f"dns_resolver=127.0.0.1:{bind.port}",
                                               f"dns_resolver=127.0.0.1:{dead}"))
    m.start()
    assert m.wait_log(r"dns-01: added _acme-challenge\.ai\.dns01\.test TXT", timeout=30), m.logs()
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(10)
    m.proc = None
    # One or both values (wildcard and base are published side by side) are left in the zone,
    # each remembered in storage (a row is written before its update is sent).
    stray = bind.txt()
    assert 1 <= len(stray) <= 2, stray
    assert len(kv_rows(m, "dns01-record:")) >= len(stray)
    # Start again (with a working resolver): the leftover is deleted first, then the order
    # runs to the end and cleans up after itself.
    m.cfg.write_text(m.cfg.read_text().replace(f"dns_resolver=127.0.0.1:{dead}",
                                               f"dns_resolver=127.0.0.1:{bind.port}"))
    m.start()
    assert m.wait_log(r"left by an earlier run", timeout=10), m.logs()
    wait_served(m.https_port, f"a.ai.{ZONE}", pb.roots(tmp_path), timeout=60)
    assert wait_until(lambda: bind.txt() == [] and kv_rows(m, "dns01-record:") == [], 15), \
        (bind.txt(), kv_rows(m, "dns01-record:"))


class CloudflareStandin:
    """tests/fixtures/cloudflare_standin.py on a loopback port, writing into BIND's zone."""

    def __init__(self, workdir, bind, token="cf-test-token-0123456789"):
        self.dir = Path(workdir) / "cf"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token_file = self.dir / "server.token"
        self.token_file.write_text(token + "\n")
        self.calls = self.dir / "calls.log"
        self.calls.write_text("")
        self.log = open(self.dir / "standin.log", "ab")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", str(FIXTURES / "cloudflare_standin.py"), "--port",
             str(self.port), "--token-file", str(self.token_file), "--zone", ZONE, "--bind",
             f"127.0.0.1:{bind.port}", "--key-file", str(bind.key_file), "--log",
             str(self.calls)], stdout=self.log, stderr=subprocess.STDOUT)
        from helpers import wait_port
        assert wait_port(self.port, 10, self.proc), tail(self.dir / "standin.log")

    @property
    def api(self):
        return f"http://127.0.0.1:{self.port}/client/v4"

    def call_log(self):
        return self.calls.read_text()

    def stop(self):
        stop_process(self.proc)

    def logs(self):
        return tail(self.dir / "standin.log") + "\n" + self.call_log()


def cf_site(tmp_path, token):
    """A site line factory for rig(site=...): chat.home.<zone> over the stand-in."""
    holder = {}
    tok = tmp_path / "cf.token"
    tok.write_text(token + "\n")
    os.chmod(tok, 0o600)

    def site(bind, up):
        cf = CloudflareStandin(tmp_path, bind)
        holder["cf"] = cf
        return (f"chat.home.{ZONE} {up} dns=cloudflare dns_token_file={tok} dns_api={cf.api} "
                f"dns_resolver=127.0.0.1:{bind.port} dns_wait=20s")
    return site, holder


def test_cloudflare_provider_through_standin(rig, tmp_path):
    site, holder = cf_site(tmp_path, "cf-test-token-0123456789")
    bind, pb, m = rig(site=site)
    cf = holder["cf"]
    try:
        m.start()
        cert = wait_served(m.https_port, f"chat.home.{ZONE}", pb.roots(tmp_path), timeout=60)
        assert ("DNS", f"chat.home.{ZONE}") in cert["subjectAltName"]
        assert m.wait_log(r"via dns-01")
        assert m.wait_log(r"dns-01: deleted _acme-challenge\.chat\.home\.dns01\.test TXT",
                          timeout=15), m.logs()
        calls = cf.call_log()
        # The zone found from the name upwards, one record made and deleted.
        assert f"GET /client/v4/zones?name=home.{ZONE} 200" in calls, calls
        assert f"GET /client/v4/zones?name={ZONE} 200" in calls, calls
        assert re.search(r"POST /client/v4/zones/\w+/dns_records 200", calls), calls
        assert re.search(r"DELETE /client/v4/zones/\w+/dns_records/\w+ 200", calls), calls
        assert bind.dig(f"_acme-challenge.chat.home.{ZONE}") == []
        assert kv_rows(m, "dns01-record:") == []
        assert "cf-test-token" not in m.log_path.read_text()
    finally:
        cf.stop()


def test_cloudflare_wrong_token(rig, tmp_path):
    site, holder = cf_site(tmp_path, "not-the-token")
    bind, pb, m = rig(site=site)
    cf = holder["cf"]
    try:
        m.start()
        assert m.wait_log(r"10000 Authentication error \(HTTP 403\); the API token needs "
                          r"Zone:Read and DNS:Edit", timeout=30), m.logs()
        assert m.wait_log(r"attempt 1 failed, next attempt in \d+ s", timeout=10)
        assert "POST" not in cf.call_log()
        assert kv_rows(m, "dns01-record:") == []
    finally:
        cf.stop()
