"""Helpers for test_openwebui.py: stand-ins started on chosen ports or parsers, an nginx
variant with a body limit and any site name, arrival timing of streamed tokens, memory
sampling, and a headless Chromium driven over the DevTools pipe.

Loopback only. Chromium is Debian's (/usr/bin/chromium); nothing is downloaded.
"""

import hashlib
import fcntl
import json
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from conftest import TARGET, NginxProxy, Upstream
from helpers import FIXTURES, PYTHON, free_port, tail


def figure(name, value):
    """A measured figure: printed, and appended to $MOAT_TEST_FIGURES when set."""
    line = f"FIGURE {TARGET} {name}: {value}"
    print(line)
    path = os.environ.get("MOAT_TEST_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")

CHROMIUM = os.environ.get("MOAT_TEST_CHROMIUM", "/usr/bin/chromium")


# ---------------------------------------------------------------------------------------------
# Stand-ins


class Standin(Upstream):
    """conftest.Upstream with a chosen uvicorn HTTP parser (--http h11|httptools), port and
    loopback address (127.0.0.2 and 127.0.0.3 play a container that moved), and a start that
    may be deferred (the app starting after the proxy) or repeated (the app restarting)."""

    def __init__(self, workdir, name, http="httptools", port=None, host="127.0.0.1"):
        super().__init__(workdir, name)
        self.http = http
        self.port = port or free_port()
        self.host = host

    @property
    def addr(self):
        return f"{self.host}:{self.port}"

    def url(self, path):
        return f"http://{self.host}:{self.port}{path}"

    def launch(self):
        env = dict(os.environ, STANDIN_NAME=self.name, PYTHONDONTWRITEBYTECODE="1")
        with open(self.out, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "uvicorn", "standin:asgi_app", "--host", self.host,
                 "--port", str(self.port), "--no-proxy-headers", "--http", self.http],
                cwd=FIXTURES, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_healthy(self, timeout=15.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url("/health"), timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"stand-in {self.name} not healthy:\n{tail(self.out)}")

    def start(self):
        return self.launch().wait_healthy()


# ---------------------------------------------------------------------------------------------
# nginx with the options the moat site line gets (max_body=, another site name)


class OwuiNginx(NginxProxy):
    def __init__(self, workdir, upstream_addr, test_ca, site="localhost", max_body=None):
        super().__init__(workdir, upstream_addr, test_ca)
        self.site = site
        self.max_body = max_body
        if site != "localhost":
            self.test_ca = dict(test_ca, **_leaf_for(test_ca, site, self.dir))

    def _prepare(self):
        super()._prepare()
        conf = self.conf.read_text()
        if self.max_body:
            conf = conf.replace("client_max_body_size 0;",
                                f"client_max_body_size {self.max_body};")
        if self.site != "localhost":
            conf = conf.replace("server_name localhost;", f"server_name {self.site};")
        self.conf.write_text(conf)


def _leaf_for(test_ca, name, d):
    """A certificate for `name` signed by the session's test CA (openssl CLI)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "site.key", "-out", "site.csr", "-subj", f"/CN={name}")
    (d / "site.ext").write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\n"
                                "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n")
    run("x509", "-req", "-in", "site.csr", "-CA", str(test_ca["ca"]), "-CAkey",
        str(test_ca["ca_key"]), "-CAcreateserial", "-out", "site.pem", "-days", "2",
        "-extfile", "site.ext")
    return {"cert": d / "site.pem", "key": d / "site.key"}


# ---------------------------------------------------------------------------------------------
# Streaming: when did each token reach the client?


def gaps_ms(times):
    return [(b - a) * 1000 for a, b in zip(times, times[1:])]


def spacing_summary(times):
    g = gaps_ms(times)
    if not g:
        return {"n": len(times), "median_ms": 0.0, "min_ms": 0.0, "max_ms": 0.0, "span_ms": 0.0}
    return {"n": len(times), "median_ms": round(statistics.median(g), 1),
            "min_ms": round(min(g), 1), "max_ms": round(max(g), 1),
            "span_ms": round((times[-1] - times[0]) * 1000, 1)}


def sse_arrivals(client, url, body, timeout=None):
    """POST url with a JSON body and read the SSE reply as it arrives. Returns (status,
    headers, [(monotonic time, event data)], time of the response head)."""
    t0 = time.monotonic()
    out = []
    with client.stream("POST", url, json=body, timeout=timeout) as r:
        t_head = time.monotonic() - t0
        buf = b""
        for chunk in r.iter_raw():
            now = time.monotonic()
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if ev.startswith(b"data: "):
                    out.append((now, ev[6:].decode()))
        return r.status_code, r.headers, out, t_head


def token_times(events):
    return [t for t, d in events if d != "[DONE]"]


def curl_line_arrivals(args, timeout=60):
    """Run curl -N and timestamp each output line as it arrives."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    p = subprocess.Popen(["curl", "-sS", "-N", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, bufsize=0, env=env)
    lines = []
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < deadline:
            data = p.stdout.read(65536)
            if not data:
                break
            now = time.monotonic()
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                lines.append((now, line.decode()))
        rc = p.wait(timeout=5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return rc, lines, p.stderr.read().decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# Memory


class MemSampler(threading.Thread):
    """Samples the proxy's summed VmRSS every `every` seconds until stop()."""

    def __init__(self, proxy, every=0.05):
        super().__init__(daemon=True)
        self.proxy, self.every = proxy, every
        self.max_rss = 0
        self._stop_ev = threading.Event()

    def run(self):
        while not self._stop_ev.is_set():
            self.max_rss = max(self.max_rss, self.proxy.mem_kib()[1])
            self._stop_ev.wait(self.every)

    def stop(self):
        self._stop_ev.set()
        self.join(5)
        return self.max_rss


def sha256_stream(it):
    h, n = hashlib.sha256(), 0
    for chunk in it:
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def ssl_ctx(cafile):
    ctx = ssl.create_default_context(cafile=str(cafile))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


# ---------------------------------------------------------------------------------------------
# Headless Chromium over --remote-debugging-pipe (fd 3: commands in, fd 4: replies out; each
# message JSON followed by a NUL byte). No port, no websocket client, no download.


class Chromium:
    def __init__(self, workdir, ca_pem, resolver_rules):
        self.dir = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        self.home = self.dir / "home"
        nssdb = self.home / ".pki" / "nssdb"
        nssdb.mkdir(parents=True)
        # Trust the proxy's root the way a user would (NSS db in $HOME), not by switching
        # certificate checks off.
        subprocess.run(["certutil", "-N", "--empty-password", "-d", f"sql:{nssdb}"],
                       check=True, capture_output=True, timeout=30)
        subprocess.run(["certutil", "-A", "-t", "C,,", "-n", "moat-test-ca", "-i", str(ca_pem),
                        "-d", f"sql:{nssdb}"], check=True, capture_output=True, timeout=30)
        self.log = self.dir / "chromium.log"
        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()
        argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={self.dir / 'profile'}",
                f"--host-resolver-rules={resolver_rules}",
                "--remote-debugging-pipe", "about:blank"]
        # Chromium expects the pipe on fds 3 and 4. Move our ends there in the child (via
        # fds >= 10 first, so neither end is overwritten before it is copied). A shell
        # cannot do this portably: dash only redirects single-digit fds.
        def place_fds():
            a = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10)
            b = fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["HOME"] = str(self.home)
        self.proc = subprocess.Popen(argv, pass_fds=(3, 4), preexec_fn=place_fds,
                                     stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        os.close(cmd_r)
        os.close(res_w)
        self._id = 0
        self._buf = b""
        self.events = []

    def send(self, method, params=None, session=None, timeout=30):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for m in self._read(deadline):
                if m.get("id") == self._id:
                    if "error" in m:
                        raise RuntimeError(f"CDP {method}: {m['error']}")
                    return m.get("result", {})
                self.events.append(m)

    def _read(self, deadline):
        import select
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no DevTools reply; chromium log:\n{tail(self.log)}")
            ready, _, _ = select.select([self._res_r], [], [], left)
            if ready:
                data = os.read(self._res_r, 1 << 20)
                if not data:
                    raise ConnectionError(f"chromium exited:\n{tail(self.log)}")
                self._buf += data
        msgs = []
        while b"\0" in self._buf:
            raw, self._buf = self._buf.split(b"\0", 1)
            msgs.append(json.loads(raw))
        return msgs

    def open_page(self, url, timeout=30):
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget",
                            {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        nav = self.send("Page.navigate", {"url": url}, session=session, timeout=timeout)
        if nav.get("errorText"):
            raise RuntimeError(f"navigation to {url} failed: {nav['errorText']}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.evaluate(session, "document.readyState")
            if state == "complete":
                return session
            time.sleep(0.1)
        raise TimeoutError(f"{url} did not finish loading")

    def evaluate(self, session, expression, timeout=60):
        res = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                             "returnByValue": True, "timeout": timeout * 1000},
                        session=session, timeout=timeout + 5)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for fd in (self._cmd_w, self._res_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.dir / "profile", ignore_errors=True)

