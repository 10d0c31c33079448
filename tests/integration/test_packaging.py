"""Part 5: moat installed the ways users install it, each checked end to end in a container.

- the .deb (packaging/build-deb.sh) installed with apt into a fresh Debian 12 booted with
  systemd under podman: enabled, active, answering, reloading, then purged without a trace;
- packaging/install.sh run twice in the same kind of booted system, then --uninstall;
- the Docker image (packaging/docker/Dockerfile) built FROM a locally made bookworm base and
  run with host networking on loopback: HTTPS answers, the healthcheck passes, it runs as
  non-root and stops within 2 s;
- `systemd-analyze verify` prints nothing for the unit; `systemd-analyze security` is
  reported.

No registry is used: the Debian root file systems are made with mmdebstrap from the apt
mirror (tests/packaging/make-bases.sh) and cached under /var/cache/moat-tests. The booted
systems run with --network=none (only their own loopback); the image runs with host
networking bound to 127.0.0.1. Only the image's build stage reaches the Debian mirror, for
its apt-get. Set MOAT_SKIP_PACKAGING=1 to leave these tests out of a quick local run.
"""

import os
import re
import shutil
import time

import pytest

from helpers import REPO, free_port
from podman_util import (SYSTEM_IMAGE, TAG, moat_image, podman_with_bases, run, skip_reason,
                         stage_sources)

pytestmark = [pytest.mark.moat_only, pytest.mark.slow]


@pytest.fixture(scope="module")
def podman():
    reason = skip_reason("dpkg-buildpackage", "dh", "systemd-analyze")
    if reason:
        pytest.skip(reason)
    p = podman_with_bases()
    yield p
    p.rm_all()


@pytest.fixture(scope="module")
def sources():
    """The checkout's sources, staged without build folders: the .deb and install.sh build
    moat from these."""
    d = stage_sources()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def booted(podman, sources):
    """A fresh Debian 12 booted with systemd, with moat's sources at /src. No network but its
    own loopback; moat's build and run dependencies are in the image already."""
    name = f"moat-test-sys-{TAG}"
    podman.containers.append(name)
    # SYS_ADMIN: the unit's PrivateTmp/ProtectSystem need namespaces podman's defaults refuse
    # (226/NAMESPACE); a real machine needs nothing.
    podman("run", "-d", "--name", name, "--systemd=always", "--network=none",
           "--cap-add", "SYS_ADMIN", "-v", f"{sources}:/src:ro", SYSTEM_IMAGE, "/sbin/init")
    deadline = time.monotonic() + 30
    while True:
        state = podman("exec", name, "systemctl", "is-system-running", "--wait", check=False)
        if state.stdout.strip() in ("running", "degraded"):
            break
        assert time.monotonic() < deadline, f"no boot: {state.stdout} {state.stderr}"
        time.sleep(0.2)
    yield name
    podman("rm", "-f", "-v", "-t", "0", name, check=False)
    podman.containers.remove(name)


@pytest.fixture(scope="module")
def deb(sources, tmp_path_factory):
    """moat's .deb, built once from the staged sources (packaging/build-deb.sh)."""
    out_dir = tmp_path_factory.mktemp("deb")
    out = run([str(sources / "packaging" / "build-deb.sh"), str(out_dir)],
              timeout=600, env=dict(os.environ, MOAT_SRC=str(sources)))
    debs = list(out_dir.glob("moat_*.deb"))
    assert len(debs) == 1, out.stdout + out.stderr
    return debs[0]


def test_unit_verify_is_silent(tmp_path):
    """systemd-analyze verify prints nothing for the unit (it exits 0 on unknown keys, so any
    output is a failure). The unit names /usr/bin/moat, which must exist for verify: point
    it at a stand-in executable."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is missing (it comes with systemd)")
    unit = (REPO / "packaging" / "systemd" / "moat.service").read_text()
    stand_in = tmp_path / "moat"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (tmp_path / "moat.service").write_text(unit.replace("/usr/bin/moat", str(stand_in)))
    cp = run(["systemd-analyze", "verify", str(tmp_path / "moat.service")], check=False,
             timeout=60)
    assert cp.returncode == 0 and not (cp.stdout + cp.stderr).strip(), cp.stdout + cp.stderr


def install_deb(podman, booted, deb):
    podman("cp", str(deb), f"{booted}:/tmp/{deb.name}")
    podman.sh(booted, f"DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "
                      f"install -y -q /tmp/{deb.name}")


def test_deb_installs_serves_and_purges(podman, booted, deb):
    install_deb(podman, booted, deb)
    st = podman.sh(booted, "systemctl is-enabled moat; systemctl is-active moat; "
                           "stat -c '%U %a' /var/lib/moat; getent passwd moat | cut -d: -f7; "
                           "dpkg-query -W -f='${Conffiles}' moat", check=False)
    lines = st.stdout.split("\n")
    assert lines[0] == "enabled" and lines[1] == "active", st.stdout + st.stderr
    assert lines[2] == "moat 700", st.stdout
    assert "/etc/moat/Moatfile" in st.stdout, "the site file is not a conffile"

    # It answers on its ports: HTTPS (the default site's upstream is not running: 502 is an
    # answer from moat), HTTP redirects, health passes; the process runs as moat.
    ans = podman.sh(booted, "for i in $(seq 50); do moat health --data /var/lib/moat "
                            ">/dev/null && break; sleep 0.1; done; "
                            "curl -sk -o /dev/null -w '%{http_code}\\n' https://localhost/; "
                            "curl -s -o /dev/null -w '%{http_code}\\n' http://localhost/; "
                            "ps -o user= -C moat; moat health --data /var/lib/moat")
    code_tls, code_http, user = ans.stdout.split("\n")[:3]
    assert code_tls == "502" and code_http == "308" and user.strip() == "moat", ans.stdout

    # The hardened unit as systemd sees it on the booted system.
    ver = podman.sh(booted, "systemd-analyze verify /lib/systemd/system/moat.service 2>&1")
    assert not ver.stdout.strip(), ver.stdout
    sec = podman.sh(booted, "systemd-analyze security --no-pager moat.service 2>&1")
    m = re.search(r"Overall exposure level for moat.service: ([0-9.]+) (\w+)", sec.stdout)
    assert m, sec.stdout[-2000:]
    print(f"\nsystemd-analyze security moat.service: {m.group(1)} {m.group(2)}")
    assert float(m.group(1)) <= 2.0, sec.stdout

    # Reload re-reads the site file in place (Type=notify: RELOADING=1 then READY=1).
    rel = podman.sh(booted, "pid=$(systemctl show -p MainPID --value moat); "
                            "echo 'localhost 127.0.0.1:8081' >/etc/moat/Moatfile; "
                            "systemctl reload moat; systemctl is-active moat; "
                            "[ \"$pid\" = \"$(systemctl show -p MainPID --value moat)\" ] "
                            "&& echo same-process; journalctl -u moat --no-pager "
                            "| grep -c 'now serving 1 site'")
    assert rel.stdout.split() == ["active", "same-process", "1"], rel.stdout + rel.stderr

    # A config error does not make a restart loop (exit 1 is in RestartPreventExitStatus).
    bad = podman.sh(booted, "echo 'localhost 127.0.0.1:8081 bogus=1' >/etc/moat/Moatfile; "
                            "systemctl restart moat; sleep 2.5; "
                            "systemctl show moat -p NRestarts -p ExecMainStatus -p ActiveState",
                    check=False)
    assert "NRestarts=0" in bad.stdout and "ExecMainStatus=1" in bad.stdout, bad.stdout
    assert "ActiveState=failed" in bad.stdout, bad.stdout

    podman.sh(booted, "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q moat; "
                      "systemctl reset-failed")
    left = podman.sh(booted, "ls -d /usr/bin/moat /etc/moat /var/lib/moat "
                             "/lib/systemd/system/moat.service "
                             "/etc/systemd/system/multi-user.target.wants/moat.service 2>/dev/null;"
                             " getent passwd moat; getent group moat; pgrep -a moat; "
                             "dpkg-query -W -f='${db:Status-Abbrev}' moat 2>/dev/null; "
                             "systemctl is-active moat", check=False)
    assert left.stdout.strip() == "inactive", f"purge left: {left.stdout}"


# A small keep-alive HTTP app for the booted system, which has perl but no python: one
# process per connection, "ok" to every request (the load below sends GETs only).
APP_PL = r"""
use IO::Socket::INET;
$SIG{CHLD} = "IGNORE";
my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 8081, Listen => 512,
                              ReuseAddr => 1) or die "listen: $!";
while (1) {
    my $c = $s->accept or next;
    my $pid = fork();
    if (defined $pid && $pid == 0) {
        close $s;
        my $buf = "";
        while (1) {
            while ($buf !~ /\r\n\r\n/) {
                my $n = sysread($c, $buf, 65536, length $buf);
                exit 0 unless $n;
            }
            $buf =~ s/^.*?\r\n\r\n//s;
            syswrite($c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n");
        }
    }
    close $c;
}
"""

# Load from inside the booted system: 4 clients (2 over HTTP/2, 2 over HTTP/1.1), each curl
# run sending 10 requests on one connection, so both new and kept-alive connections are in
# flight when a reload lands. Bounded: 400 runs per client at most, stopped by /tmp/stop.
LOAD_SH = r"""
rm -f /tmp/stop /tmp/codes.*
load() {
    urls=$(for i in $(seq 10); do printf ' https://localhost/r%s' "$i"; done)
    for n in $(seq 400); do
        [ -e /tmp/stop ] && break
        curl -sk $2 --max-time 20 -o /dev/null -o /dev/null -o /dev/null -o /dev/null \
            -o /dev/null -o /dev/null -o /dev/null -o /dev/null -o /dev/null -o /dev/null \
            -w '%{http_code}\n' $urls >>/tmp/codes.$1 2>/dev/null
    done
}
load 1 --http2 & load 2 --http2 & load 3 --http1.1 & load 4 --http1.1 &
sleep 1
for i in 1 2 3; do
    echo "localhost 127.0.0.1:8081 read_timeout=${i}0m" >/etc/moat/Moatfile
    systemctl reload moat || echo reload-failed
    sleep 0.7
done
sleep 0.5
touch /tmp/stop
wait
cat /tmp/codes.* | sort | uniq -c
"""

FINGERPRINT = ("openssl s_client -connect 127.0.0.1:443 -servername localhost </dev/null "
               "2>/dev/null | openssl x509 -noout -fingerprint -sha256")


def test_deb_reload_under_load_restart_and_journal(podman, booted, deb):
    """Under systemd: `systemctl reload` three times under load fails no request; `systemctl
    restart` serves the same certificate from /var/lib/moat (no new issuance); the journal
    has moat's lines as text with their priorities, so `journalctl -p err` lists only the
    errors."""
    since = podman.sh(booted, "date +%s").stdout.strip()
    install_deb(podman, booted, deb)
    podman.sh(booted, "cat >/tmp/app.pl <<'EOF'\n" + APP_PL + "\nEOF\n"
                      "systemd-run --unit moat-test-app --quiet perl /tmp/app.pl; "
                      "echo 'localhost 127.0.0.1:8081' >/etc/moat/Moatfile; "
                      "systemctl reload moat; "
                      "for i in $(seq 50); do curl -sk -o /dev/null -w '%{http_code}' "
                      "https://localhost/ | grep -q 200 && break; sleep 0.1; done")
    pid = podman.sh(booted, "systemctl show -p MainPID --value moat").stdout.strip()

    t0 = time.monotonic()
    load = podman.sh(booted, LOAD_SH, timeout=120)
    took = time.monotonic() - t0
    counts = {}
    for line in load.stdout.split("\n"):
        if line.strip() and line.split()[0].isdigit() and len(line.split()) == 2:
            n, code = line.split()
            counts[code] = counts.get(code, 0) + int(n)
    total, ok = sum(counts.values()), counts.get("200", 0)
    after = podman.sh(booted, "systemctl show -p MainPID --value moat; systemctl is-active moat;"
                              f" journalctl -u moat --since @{since} -o cat | "
                              "grep -c 'reload: now serving'").stdout.split()
    print(f"\nreload x3 under load: {total} requests (curl runs of 10) in {took:.1f} s, "
          f"{total - ok} failed ({counts})")
    assert "reload-failed" not in load.stdout, load.stdout
    assert total >= 40 and ok == total, (counts, load.stdout[-2000:])
    # The same process, reloaded: the first reload (the app's site) and the three above.
    assert after == [pid, "active", "4"], after

    # A restart keeps the certificate: same one served, none issued since the install.
    before = podman.sh(booted, FINGERPRINT).stdout.strip()
    podman.sh(booted, "systemctl restart moat; for i in $(seq 50); do curl -sk -o /dev/null "
                      "-w '%{http_code}' https://localhost/ | grep -q 200 && break; sleep 0.1;"
                      " done")
    fp = podman.sh(booted, FINGERPRINT).stdout.strip()
    journal = podman.sh(booted, f"journalctl -u moat --since @{since} -o cat").stdout
    print(f"restart: certificate {before} before, {fp} after")
    assert before.startswith("sha256 Fingerprint=") and fp == before, (before, fp)
    assert journal.count("issued a certificate for localhost") == 1, journal[-3000:]
    assert pid != podman.sh(booted, "systemctl show -p MainPID --value moat").stdout.strip()

    # A reload with a broken site file: an error in the journal, at priority err; moat keeps
    # serving the previous configuration.
    bad = podman.sh(booted, "echo 'localhost 127.0.0.1:8081 bogus_option=1' "
                            ">/etc/moat/Moatfile; systemctl reload moat; sleep 0.3; "
                            "curl -sk -o /dev/null -w '%{http_code}\\n' https://localhost/; "
                            f"journalctl -u moat --since @{since} -p err -o cat; echo ---; "
                            f"journalctl -u moat --since @{since} -p info -o cat | "
                            "grep -v '^{'; echo ---; "
                            f"journalctl -u moat --since @{since} -p err -o verbose | "
                            "grep -c '^ *PRIORITY=3$'")
    first, infos, nprio = bad.stdout.split("---\n")
    served, errs = first.split("\n", 1)
    print(f"journalctl -u moat -p err:\n{errs}")
    err_lines = [ln for ln in errs.split("\n") if ln.strip()]
    assert served == "200", bad.stdout
    assert err_lines and any("bogus_option" in ln for ln in err_lines), bad.stdout
    assert all("still serving the previous configuration" in ln or "bogus_option" in ln
               for ln in err_lines), err_lines
    assert int(nprio.strip()) == len(err_lines), bad.stdout
    # Info lines are in the journal as text (not JSON), and not among the errors.
    assert "reload: now serving 1 site(s)" in infos and "ready with" in journal, infos
    assert not any(ln.startswith("{") for ln in journal.split("\n") if "reload:" in ln)
    assert not any("now serving" in ln or "listening on" in ln for ln in err_lines)

    podman.sh(booted, "systemctl stop moat-test-app; DEBIAN_FRONTEND=noninteractive "
                      "apt-get purge -y -q moat; systemctl reset-failed")


def test_install_script_twice_then_uninstall(podman, booted):
    script = "/src/packaging/install.sh"
    first = podman.sh(booted, f"{script} localhost 127.0.0.1:8080 --email admin@example.com",
                      timeout=600)
    assert "moat is running" in first.stdout, first.stdout + first.stderr
    probe = ("systemctl is-enabled moat; systemctl is-active moat; "
             "systemctl show -p MainPID --value moat; "
             "moat ca-root --data /var/lib/moat | sha256sum | cut -c1-16; "
             "curl -sk -o /dev/null -w '%{http_code}\\n' https://localhost/; "
             "ps -o user= -C moat")
    before = podman.sh(booted, probe).stdout.split()
    assert before[:2] == ["enabled", "active"] and before[4:] == ["502", "moat"], before

    # Again, same arguments: nothing changed, so nothing restarts and data is kept.
    second = podman.sh(booted, f"{script} localhost 127.0.0.1:8080 --email admin@example.com",
                       timeout=600)
    assert "moat is running" in second.stdout, second.stdout + second.stderr
    assert podman.sh(booted, probe).stdout.split() == before
    conf = podman.sh(booted, "grep -v '^#' /etc/moat/Moatfile; ls /etc/moat").stdout
    assert conf.split("\n")[0] == "localhost 127.0.0.1:8080 email=admin@example.com", conf
    assert "Moatfile.bak" not in conf, conf

    gone = podman.sh(booted, f"{script} --uninstall; ls /usr/local/bin/moat "
                             "/etc/systemd/system/moat.service 2>/dev/null; "
                             "ls /etc/moat/Moatfile /var/lib/moat/moat.db; pgrep -a moat; "
                             "systemctl is-active moat", check=False)
    assert gone.stdout.split("\n")[-4:-1] == ["/etc/moat/Moatfile", "/var/lib/moat/moat.db",
                                               "inactive"], gone.stdout
    purged = podman.sh(booted, f"{script} --uninstall --purge; ls -d /etc/moat /var/lib/moat "
                               "2>/dev/null; getent passwd moat; echo end", check=False)
    assert purged.stdout.strip().split("\n")[-1] == "end" and purged.stdout.count("\n") == 2, \
        purged.stdout


def test_docker_image_https_health_nonroot_fast_stop(podman):
    image = moat_image(podman)  # packaging/docker/Dockerfile, built once per run (podman_util)

    hp, sp = free_port(), free_port()
    name = f"moat-test-img-{TAG}"
    podman.containers.append(name)
    # Host networking, bound to loopback on high ports; the site line from the environment.
    # The healthcheck timer needs systemd on the host: run it by hand instead.
    podman("run", "-d", "--name", name, "--network=host", "--health-interval=disable",
           "-e", "MOAT_SITE=localhost 127.0.0.1:9", "-e", f"MOAT_HTTP_PORT={hp}",
           "-e", f"MOAT_HTTPS_PORT={sp}", "-e", "MOAT_LISTEN=127.0.0.1", image)
    code = ""
    for _ in range(50):
        # --max-time above upstream_wait (10 s): moat waits that long for the app before
        # its 502.
        cp = run(["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "15",
                  "--resolve", f"localhost:{sp}:127.0.0.1", f"https://localhost:{sp}/"],
                 check=False, timeout=20)
        code = cp.stdout
        if code == "502":  # moat answered; nothing listens on the upstream port 9
            break
        time.sleep(0.1)
    logs = podman("logs", name, check=False)
    assert code == "502", f"https answered {code!r}\n{logs.stdout}{logs.stderr}"
    hc = podman("healthcheck", "run", name, check=False)
    assert hc.returncode == 0, hc.stdout + hc.stderr
    ident = podman("exec", name, "id", "-u").stdout.strip()
    top = podman("top", name, "user", "pid", "args").stdout
    assert ident != "0" and re.search(r"^moat\s+1\s+moat run", top, re.M), top
    cfg = podman("inspect", name, "--format", "{{.Config.User}}|{{json .Config.Healthcheck}}")
    assert cfg.stdout.startswith("moat|") and "health" in cfg.stdout, cfg.stdout

    t0 = time.monotonic()
    podman("stop", "-t", "10", name)
    took = time.monotonic() - t0
    state = podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip()
    assert took < 2.0 and state == "0", f"stop took {took:.2f}s, exit {state}"
    podman("rm", "-f", "-v", name)
    podman.containers.remove(name)

    # Ports 80 and 443 as the non-root user, through the file capability: in a container of
    # its own (no network but its loopback), moat binds them and reports healthy.
    name = f"moat-test-img80-{TAG}"
    podman.containers.append(name)
    podman("run", "-d", "--name", name, "--network=none", "--health-interval=disable",
           image, "localhost", "127.0.0.1:9")
    hc = None
    for _ in range(50):
        hc = podman("healthcheck", "run", name, check=False)
        if hc.returncode == 0:
            break
        time.sleep(0.1)
    logs = podman("logs", name, check=False)
    assert hc.returncode == 0, f"{hc.stdout}{hc.stderr}\n{logs.stdout}{logs.stderr}"
    assert "listening on port 443" in logs.stdout + logs.stderr
    podman("rm", "-f", "-v", "-t", "2", name)
    podman.containers.remove(name)
