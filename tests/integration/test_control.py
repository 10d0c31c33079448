"""The control socket DATA/control.sock and the commands that use it: reload (the site file's
errors printed, exit 1, the old configuration still served), stop --grace, renew, health; the
socket's mode, its refusal in a folder other users can enter, and the signal fallback."""

import json
import os
import socket
import stat
import subprocess
import threading
import time

import httpx
import pytest

from conftest import MOAT_BIN, MoatProxy, _teardown, require_moat
from helpers import tail

pytestmark = pytest.mark.moat_only


def run(*args, timeout=30):
    return subprocess.run([MOAT_BIN, *args], capture_output=True, text=True, timeout=timeout)


def ask(path, raw, timeout=10):
    """Send raw bytes on the control socket, return what comes back before it closes."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(raw)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_reload_of_a_broken_site_file_prints_errors_and_keeps_serving(moat, upstream,
                                                                      upstream_factory):
    p = moat(upstream.addr)
    data = str(p.data)
    p.config.write_text("localhost 127.0.0.1:9 max_bdy=1\n")
    cp = run("reload", "--data", data)
    assert cp.returncode == 1, (cp.stdout, cp.stderr)
    # The same FILE:LINE:COLUMN line `moat validate` prints, on the CLI's own stderr.
    v = run("validate", "--config", str(p.config))
    first = v.stderr.splitlines()[0]
    assert first.startswith(f"{p.config}:1:") and "did you mean 'max_body'" in first
    assert first in cp.stderr.splitlines()
    assert "previous configuration" in cp.stderr
    assert "no control socket" not in cp.stderr
    with p.client() as c:
        r = c.get(p.url("/health"))
    assert r.status_code == 200 and r.headers.get("x-standin") == "main"
    # A good file is taken, and the answer comes after it is served.
    other = upstream_factory("B")
    p.set_upstream(other.addr)
    cp = run("reload", "--data", data)
    assert cp.returncode == 0, cp.stderr
    assert "now serving 1 site(s)" in cp.stdout
    with p.client() as c:
        assert c.get(p.url("/health")).headers.get("x-standin") == "B"
    st = json.loads(run("status", "--data", data, "--json").stdout)
    assert st["reloads"] == {"ok": 1, "failed": 1}


def test_socket_is_0600_and_answers_one_json_request(moat, upstream):
    p = moat(upstream.addr)
    sock = p.data / "control.sock"
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(p.data).st_mode) == 0o700
    a = json.loads(ask(sock, b'{"cmd":"health"}\n'))
    assert a["ok"] is True and a["pid"] == p.pid and a["stopping"] is False
    # Garbage, an unknown command and a request past the size limit get an error answer.
    assert json.loads(ask(sock, b"nonsense\n"))["ok"] is False
    a = json.loads(ask(sock, b'{"cmd":"frobnicate"}\n'))
    assert a["ok"] is False and "unknown command" in a["error"]
    a = json.loads(ask(sock, b'{"cmd":"health","pad":"' + b"x" * 5000 + b'"}\n'))
    assert a["ok"] is False and "too long" in a["error"]
    # Still serving, and health over the socket plus the listener check says so.
    cp = run("health", "--data", str(p.data))
    assert cp.returncode == 0, cp.stderr


def test_not_opened_in_a_folder_others_can_enter(tmp_path, request, upstream):
    require_moat()
    p = MoatProxy(tmp_path / "open", upstream.addr)
    os.chmod(p.data, 0o755)
    started = [p]
    try:
        p.start()
        err = tail(p.stderr_path)
        assert "control socket: not opened" in err and "chmod 700" in err
        assert not (p.data / "control.sock").exists()
        cp = run("status", "--data", str(p.data))
        assert cp.returncode == 1 and "control socket" in cp.stderr
        # reload falls back to the pid file and SIGHUP, and says so.
        cp = run("reload", "--data", str(p.data))
        assert cp.returncode == 0, cp.stderr
        assert "no control socket" in cp.stderr and "using the pid file" in cp.stderr
        with p.client() as c:
            assert c.get(p.url("/health")).status_code == 200
    finally:
        _teardown(request, started)


def test_stop_with_grace_ends_a_slow_request_early(moat, upstream):
    p = moat(upstream.addr)
    done = {}

    def slow():
        try:
            with p.client(timeout=30) as c:
                done["r"] = c.get(p.url("/slow?seconds=20&pieces=40"))
        except httpx.HTTPError as e:
            done["e"] = e

    t = threading.Thread(target=slow, daemon=True)
    t.start()
    time.sleep(1.0)  # the request is in flight
    t0 = time.monotonic()
    stopper = subprocess.Popen([MOAT_BIN, "stop", "--data", str(p.data), "--grace", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # While it drains: the socket is gone and health says so at once.
    deadline = time.monotonic() + 5
    while (p.data / "control.sock").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not (p.data / "control.sock").exists()
    h0 = time.monotonic()
    health = run("health", "--data", str(p.data))
    assert health.returncode == 1 and time.monotonic() - h0 < 3, health.stderr
    out, err = stopper.communicate(timeout=40)
    cp = subprocess.CompletedProcess(stopper.args, stopper.returncode, out, err)
    took = time.monotonic() - t0
    assert cp.returncode == 0, cp.stderr
    assert "stopped" in cp.stdout
    assert took < 9, took  # 2 s of grace, not the default 30 or the request's 20
    assert p.proc.wait(timeout=10) == 0
    assert not (p.data / "control.sock").exists()
    t.join(timeout=30)
    assert "grace period over" in tail(p.stderr_path) or "e" in done


def test_renew_over_the_socket(moat, upstream):
    p = moat(upstream.addr)
    cp = run("renew", "--data", str(p.data))
    assert cp.returncode == 0, cp.stderr
    assert "asked process" in cp.stdout and "no control socket" not in cp.stderr
    deadline = time.monotonic() + 5
    while "renew" not in tail(p.stderr_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "acme: renew: no ACME certificate covers any name" in tail(p.stderr_path)
