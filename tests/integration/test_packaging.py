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
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from helpers import REPO, free_port

HERE = REPO / "tests" / "packaging"
CACHE = Path(os.environ.get("MOAT_TEST_CACHE", "/var/cache/moat-tests"))
SYSTEM_IMAGE = "localhost/moat-test-system:bookworm"
SLIM_IMAGE = "docker.io/library/debian:bookworm-slim"
MOAT_IMAGE = "localhost/moat:test"
BUILD_IMAGE = "localhost/moat-build:cache"
SOURCES = ["CMakeLists.txt", "include", "server", "http2", "acme", "storage", "packaging"]
TAG = uuid.uuid4().hex[:8]

pytestmark = [pytest.mark.moat_only, pytest.mark.slow]


def run(cmd, timeout=300, check=True, **kw):
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and cp.returncode != 0:
        raise AssertionError(f"{cmd} failed rc={cp.returncode}\n{cp.stdout[-3000:]}\n"
                             f"{cp.stderr[-3000:]}")
    return cp


class Podman:
    def __init__(self):
        self.env = dict(os.environ, CONTAINERS_CONF=str(HERE / "containers.conf"))
        # Private storage under the cache (images and build layers survive between runs);
        # --root/--runroot rather than a storage.conf, which made every exit wait ~20 s.
        self.base = ["podman", "--root", str(CACHE / "storage"), "--runroot",
                     "/run/moat-tests-podman", "--storage-driver", "overlay"]
        self.containers = []

    def __call__(self, *args, timeout=300, check=True):
        return run(self.base + list(args), timeout=timeout, check=check, env=self.env)

    def sh(self, name, script, timeout=300, check=True):
        return self("exec", name, "bash", "-c", script, timeout=timeout, check=check)

    def rm_all(self):
        for name in self.containers:
            self("rm", "-f", "-t", "0", name, check=False, timeout=60)
        self.containers = []


def _skip_reason():
    if os.environ.get("MOAT_SKIP_PACKAGING"):
        return "MOAT_SKIP_PACKAGING is set"
    if os.geteuid() != 0:
        return "needs root (podman with its own storage, a booted systemd container)"
    for tool in ("podman", "runc", "mmdebstrap", "dpkg-buildpackage", "dh", "systemd-analyze"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (packaging/deps.sh --test installs it)"
    return None


@pytest.fixture(scope="module")
def podman():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    run([str(HERE / "make-bases.sh")], timeout=600)
    p = Podman()
    # Imported once; a new tarball (the cache was cleared) gets imported again.
    for image, tar in ((SYSTEM_IMAGE, "system.tar"), (SLIM_IMAGE, "slim.tar")):
        stamp = CACHE / (tar + ".imported")
        tar_mtime = str((CACHE / tar).stat().st_mtime)
        present = p("image", "exists", image, check=False).returncode == 0
        if not present or not stamp.exists() or stamp.read_text() != tar_mtime:
            p("import", str(CACHE / tar), image, timeout=300)
            stamp.write_text(tar_mtime)
    yield p
    p.rm_all()


@pytest.fixture(scope="module")
def sources():
    """The checkout's sources, staged without build folders: the .deb, install.sh and the
    image all build moat from these."""
    d = Path(tempfile.mkdtemp(prefix="moat-pkg-src."))
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, d / name, symlinks=True)
        elif src.exists():
            shutil.copy2(src, d / name)
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
    podman("rm", "-f", "-t", "0", name, check=False)
    podman.containers.remove(name)


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


def test_deb_installs_serves_and_purges(podman, sources, booted, tmp_path):
    out = run([str(sources / "packaging" / "build-deb.sh"), str(tmp_path / "deb")],
              timeout=600, env=dict(os.environ, MOAT_SRC=str(sources)))
    debs = list((tmp_path / "deb").glob("moat_*.deb"))
    assert len(debs) == 1, out.stdout + out.stderr
    podman("cp", str(debs[0]), f"{booted}:/tmp/{debs[0].name}")

    podman.sh(booted, f"DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=120 "
                      f"install -y -q /tmp/{debs[0].name}")
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


def test_docker_image_https_health_nonroot_fast_stop(podman, sources):
    # The build stage is tagged too, and the previous run's images are removed once the new
    # ones are tagged: the cached storage does not grow, and the build stage's apt layer
    # (the slow part, from the Debian mirror) stays as the cache for the next run.
    dockerfile = str(sources / "packaging" / "docker" / "Dockerfile")
    for target, tag in (("build", BUILD_IMAGE), (None, MOAT_IMAGE)):
        old = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        args = ["build", "--pull=never", "--network=host", "--format", "docker", "-f",
                dockerfile, "-t", tag] + (["--target", target] if target else [])
        build = podman(*args, str(sources), timeout=900)
        new = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        assert new.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        if old.returncode == 0 and old.stdout.strip() != new.stdout.strip():
            podman("rmi", old.stdout.strip(), check=False)

    hp, sp = free_port(), free_port()
    name = f"moat-test-img-{TAG}"
    podman.containers.append(name)
    # Host networking, bound to loopback on high ports; the site line from the environment.
    # The healthcheck timer needs systemd on the host: run it by hand instead.
    podman("run", "-d", "--name", name, "--network=host", "--health-interval=disable",
           "-e", "MOAT_SITE=localhost 127.0.0.1:9", "-e", f"MOAT_HTTP_PORT={hp}",
           "-e", f"MOAT_HTTPS_PORT={sp}", "-e", "MOAT_LISTEN=127.0.0.1", MOAT_IMAGE)
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
    podman("rm", "-f", name)
    podman.containers.remove(name)

    # Ports 80 and 443 as the non-root user, through the file capability: in a container of
    # its own (no network but its loopback), moat binds them and reports healthy.
    name = f"moat-test-img80-{TAG}"
    podman.containers.append(name)
    podman("run", "-d", "--name", name, "--network=none", "--health-interval=disable",
           MOAT_IMAGE, "localhost", "127.0.0.1:9")
    hc = None
    for _ in range(50):
        hc = podman("healthcheck", "run", name, check=False)
        if hc.returncode == 0:
            break
        time.sleep(0.1)
    logs = podman("logs", name, check=False)
    assert hc.returncode == 0, f"{hc.stdout}{hc.stderr}\n{logs.stdout}{logs.stderr}"
    assert "listening on port 443" in logs.stdout + logs.stderr
    podman("rm", "-f", "-t", "2", name)
    podman.containers.remove(name)
