"""Fixtures for moat's integration tests.

    /usr/bin/python3 -m pytest tests/integration            # against $MOAT_BIN (build/moat)
    MOAT_TEST_TARGET=nginx /usr/bin/python3 -m pytest tests/integration   # same tests, nginx

The nginx target exists to prove the tests can fail: the proxy tests run unchanged against a
generated, reasonable nginx configuration (the kind people put in front of Open WebUI), and
whatever nginx does differently from moat's contract shows up as a failure. Tests of moat's
own CLI are skipped there.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402
from helpers import FIXTURES, PYTHON, REPO, free_port, stop_process, tail, wait_port  # noqa: E402

MOAT_BIN = os.environ.get("MOAT_BIN", str(REPO / "build" / "moat"))
TARGET = os.environ.get("MOAT_TEST_TARGET", "moat")
NGINX_BIN = os.environ.get("NGINX_BIN", "/usr/sbin/nginx")
READY_TIMEOUT = 10.0


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes seconds (still part of the default run)")
    config.addinivalue_line("markers", "moat_only: exercises moat's CLI; skipped for nginx")


def pytest_report_header(config):
    return f"moat integration target: {TARGET} ({MOAT_BIN if TARGET == 'moat' else NGINX_BIN})"


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Remember each phase's outcome so fixtures can dump logs only for failed tests.
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request):
    node = request.node
    return any(getattr(getattr(node, "rep_" + w, None), "failed", False)
               for w in ("setup", "call"))


def pytest_collection_modifyitems(config, items):
    if TARGET == "nginx":
        skip = pytest.mark.skip(reason="tests moat's own CLI; nginx has no equivalent")
        for item in items:
            if "moat_only" in item.keywords:
                item.add_marker(skip)


def require_moat():
    if not os.access(MOAT_BIN, os.X_OK):
        pytest.skip(f"moat binary not found at {MOAT_BIN} (build it or set MOAT_BIN)")


# ---------------------------------------------------------------------------------------------
# Stand-in upstream (tests/fixtures/standin.py under uvicorn)


class Upstream:
    def __init__(self, workdir, name):
        self.name = name
        self.port = None
        self.proc = None
        self.out = Path(workdir) / f"standin-{name}.log"

    @property
    def addr(self):
        return f"127.0.0.1:{self.port}"

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self):
        last = ""
        for _ in range(3):
            self.port = free_port()
            env = dict(os.environ, STANDIN_NAME=self.name, PYTHONDONTWRITEBYTECODE="1")
            with open(self.out, "ab") as log:
                # --no-proxy-headers: standin.py applies that middleware itself, after noting
                # the TCP peer address for /echo (see its docstring).
                self.proc = subprocess.Popen(
                    [PYTHON, "-m", "uvicorn", "standin:asgi_app", "--host", "127.0.0.1",
                     "--port", str(self.port), "--no-proxy-headers"],
                    cwd=FIXTURES, env=env, stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(self.url("/health"), timeout=1).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            last = tail(self.out)
            self.stop()
        raise RuntimeError(f"stand-in {self.name} did not become healthy:\n{last}")

    def stats(self):
        return httpx.get(self.url("/__stats"), timeout=5).json()

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, timeout=5)
            self.proc = None


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    """One stand-in shared by the session (STANDIN_NAME=main)."""
    u = Upstream(tmp_path_factory.mktemp("upstream"), "main").start()
    yield u
    u.stop()


@pytest.fixture
def upstream_factory(tmp_path):
    """Start extra stand-ins: upstream_factory("A") -> Upstream with X-Standin: A."""
    started = []

    def make(name):
        u = Upstream(tmp_path, name).start()
        started.append(u)
        return u

    yield make
    for u in started:
        u.stop()


# ---------------------------------------------------------------------------------------------
# Proxies under test. Both kinds offer: http_port, https_port, ca (path of the CA bundle that
# verifies "localhost"), pid, url(path), curl_args(), client(), set_upstream(addr), reload(),
# send_signal(sig), stop(sig) -> exit code, mem_kib() -> (VmHWM, VmRSS) summed over its
# processes, access_log (path of JSON lines), access_entries(), logs().


class _Proxy:
    kind = "?"

    def __init__(self, workdir, upstream_addr):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.upstream_addr = upstream_addr
        self.proc = None
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"
        self.access_log = self.dir / "access.log"
        self.exit_code = None

    @property
    def pid(self):
        return self.proc.pid

    def url(self, path="/"):
        return f"https://localhost:{self.https_port}{path}"

    def http_url(self, path="/"):
        return f"http://localhost:{self.http_port}{path}"

    def curl_args(self):
        return ["--cacert", str(self.ca)] + helpers.resolve_args(self.http_port, self.https_port)

    def client(self, **kw):
        # Connect to 127.0.0.1 while verifying and sending "localhost": the URL host is what
        # httpx uses for SNI/Host, and the transport's local resolution of localhost is
        # 127.0.0.1 (loopback only).
        kw.setdefault("timeout", 30)
        return httpx.Client(verify=str(self.ca), http2=False, trust_env=False, **kw)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def pids(self):
        return [self.pid]

    def mem_kib(self):
        hwm = rss = 0
        for p in self.pids():
            try:
                a, b = helpers.proc_mem_kib(p)
            except OSError:
                continue
            hwm += a
            rss += b
        return hwm, rss

    def logs(self):
        return (f"--- {self.kind} stdout ({self.stdout_path})\n{tail(self.stdout_path)}\n"
                f"--- {self.kind} stderr ({self.stderr_path})\n{tail(self.stderr_path)}\n"
                f"--- access log\n{tail(self.access_log, 3000)}")

    def access_entries(self):
        out = []
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def _spawn(self, argv):
        self.proc = subprocess.Popen(argv, cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=open(self.stdout_path, "ab"),
                                     stderr=open(self.stderr_path, "ab"))

    def start(self):
        """Start on fresh ports; retry with new ports if the process dies early (a foreign
        process may have taken a port between free_port() and bind())."""
        self.exit_code = None  # a restarted proxy must be stopped again at teardown
        for attempt in range(3):
            self.http_port, self.https_port = free_port(), free_port()
            self._prepare()
            self._spawn(self.argv())
            if wait_port(self.https_port, READY_TIMEOUT, self.proc) and \
                    wait_port(self.http_port, 2.0, self.proc):
                self._after_ready()
                return self
            died = self.proc.poll() is not None
            stop_process(self.proc, signal.SIGKILL, extra_pids=self._kids())
            err = tail(self.stderr_path)
            if not (died and ("in use" in err.lower() or "EADDRINUSE" in err)):
                break
        raise RuntimeError(f"{self.kind} did not become ready within {READY_TIMEOUT}s "
                           f"(exit={self.proc.returncode})\n{self.logs()}")

    def _kids(self):
        try:
            return helpers.child_pids(self.pid)
        except Exception:
            return []

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def reload(self):
        self.send_signal(signal.SIGHUP)

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        if self.proc is None:
            return None
        if self.exit_code is None:
            self.exit_code = stop_process(self.proc, sig, timeout, extra_pids=self._kids())
        return self.exit_code


class MoatProxy(_Proxy):
    kind = "moat"

    def __init__(self, workdir, upstream_addr, site="localhost", site_opts=(), use_config=True,
                 extra_args=()):
        super().__init__(workdir, upstream_addr)
        self.site = site
        self.site_opts = list(site_opts)
        self.use_config = use_config
        self.extra_args = list(extra_args)
        self.config = self.dir / "Moatfile"
        self.data = self.dir / "data"
        # Private, as moat makes it and as install.sh and the image do: the control socket is
        # only opened in a folder other users cannot enter.
        self.data.mkdir(mode=0o700, exist_ok=True)
        self.ca = self.dir / "ca.pem"

    def site_line(self):
        return " ".join([self.site, self.upstream_addr, *self.site_opts])

    def _prepare(self):
        if self.use_config:
            self.config.write_text(f"# generated by tests/integration/conftest.py\n"
                                   f"{self.site_line()}\n")

    def argv(self):
        argv = [MOAT_BIN, "run"]
        if self.use_config:
            argv += ["--config", str(self.config)]
        else:
            argv += [self.site, self.upstream_addr, *self.site_opts]
        # --listen keeps the test instance on loopback (moat's default is every address).
        return argv + ["--listen", "127.0.0.1", "--data", str(self.data),
                       "--http-port", str(self.http_port),
                       "--https-port", str(self.https_port), "--log-level", "info",
                       "--access-log", str(self.access_log), *self.extra_args]

    def _after_ready(self):
        cp = subprocess.run([MOAT_BIN, "ca-root", "--data", str(self.data)],
                            capture_output=True, timeout=10)
        pem = cp.stdout.decode("ascii", "replace")
        if cp.returncode != 0 or "BEGIN CERTIFICATE" not in pem:
            raise RuntimeError(f"moat ca-root failed rc={cp.returncode}: {pem!r} "
                               f"{cp.stderr.decode(errors='replace')}\n{self.logs()}")
        self.ca.write_text(pem)

    def set_upstream(self, addr):
        """Rewrite the Moatfile atomically (a reload must never read half a file)."""
        self.upstream_addr = addr
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(f"{self.site_line()}\n")
        os.replace(tmp, self.config)


NGINX_CONF = """\
# generated by tests/integration/conftest.py: a typical TLS reverse proxy for Open WebUI
{user}
worker_processes 2;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/stderr.log info;
events {{ worker_connections 1024; }}
http {{
    log_format moatjson escape=json '{{"time":"$time_iso8601","remote":"$remote_addr",'
        '"host":"$host","method":"$request_method","path":"$request_uri",'
        '"proto":"$server_protocol","status":$status,"bytes_in":$request_length,'
        '"bytes_out":$bytes_sent,"duration_ms":"$request_time","upstream":"$upstream_addr",'
        '"upstream_ms":"$upstream_response_time"}}';
    access_log {dir}/access.log moatjson;
    client_body_temp_path {dir}/tmp-body;
    proxy_temp_path {dir}/tmp-proxy;
    fastcgi_temp_path {dir}/tmp-fastcgi;
    uwsgi_temp_path {dir}/tmp-uwsgi;
    scgi_temp_path {dir}/tmp-scgi;
    client_max_body_size 0;
    large_client_header_buffers 4 128k;
    upstream app {{ server {upstream}; keepalive 16; }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    server {{
        listen 127.0.0.1:{http_port};
        server_name localhost;
        return 308 https://$host:{https_port}$request_uri;
    }}
    server {{
        listen 127.0.0.1:{https_port} ssl http2;
        server_name localhost;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


# MOAT_TEST_NGINX_MUTANT=name[,name...] breaks the generated nginx config on purpose, to show
# that a test which passes against nginx fails when the behaviour it checks is missing.
# Each maps to (text in NGINX_CONF, replacement) pairs; "sigterm_as_sigquit" instead makes a
# test's SIGTERM reach nginx as SIGQUIT (its graceful stop), to show test 9 can pass.
NGINX_MUTANTS = {
    "bad_cert": [("ssl_certificate {cert};", "ssl_certificate {ca_cert};"),
                 ("ssl_certificate_key {key};", "ssl_certificate_key {ca_key};")],
    "redirect_no_port": [("https://$host:{https_port}$request_uri", "https://$host$request_uri")],
    "body_in_memory": [("client_max_body_size 0;",
                        "client_max_body_size 0; client_body_buffer_size 80m;")],
    "body_limit_1m": [("client_max_body_size 0;", "client_max_body_size 1m;")],
    "no_keepalive": [("keepalive 16;", ""), ("client_max_body_size 0;",
                                             "client_max_body_size 0; keepalive_timeout 0;")],
    "plain_502": [("location / {{", "error_page 502 /502.txt; location = /502.txt {{ internal; "
                   "default_type text/plain; return 200 'down'; }} location / {{")],
    "kill_on_reload": [("worker_processes 2;",
                        "worker_processes 2; worker_shutdown_timeout 300ms;")],
    "no_forwarded_proto": [("proxy_set_header X-Forwarded-Proto $scheme;", "")],
    "small_headers": [("large_client_header_buffers 4 128k;", "")],
}


def _nginx_mutants():
    names = [m for m in os.environ.get("MOAT_TEST_NGINX_MUTANT", "").split(",") if m]
    unknown = set(names) - set(NGINX_MUTANTS) - {"sigterm_as_sigquit"}
    if unknown:
        raise pytest.UsageError(f"unknown MOAT_TEST_NGINX_MUTANT {sorted(unknown)}; "
                                f"known: {sorted(NGINX_MUTANTS)} + sigterm_as_sigquit")
    return names


class NginxProxy(_Proxy):
    kind = "nginx"

    def __init__(self, workdir, upstream_addr, test_ca):
        super().__init__(workdir, upstream_addr)
        self.test_ca = test_ca
        self.ca = test_ca["ca"]
        self.conf = self.dir / "nginx.conf"

    def _prepare(self):
        user = "user root;" if os.geteuid() == 0 else ""
        conf = NGINX_CONF
        for m in _nginx_mutants():
            for a, b in NGINX_MUTANTS.get(m, []):
                assert a in conf, f"mutant {m}: {a!r} not in the template"
                conf = conf.replace(a, b)
        self.conf.write_text(conf.format(
            user=user, dir=self.dir, upstream=self.upstream_addr, http_port=self.http_port,
            https_port=self.https_port, cert=self.test_ca["cert"], key=self.test_ca["key"],
            ca_cert=self.test_ca["ca"], ca_key=self.test_ca["ca_key"]))

    def argv(self):
        return [NGINX_BIN, "-c", str(self.conf), "-p", str(self.dir), "-e",
                str(self.stderr_path)]

    def _after_ready(self):
        pass

    def pids(self):
        return [self.pid] + self._kids()

    def send_signal(self, sig):
        if sig == signal.SIGTERM and "sigterm_as_sigquit" in _nginx_mutants():
            sig = signal.SIGQUIT
        self.proc.send_signal(sig)

    def set_upstream(self, addr):
        self.upstream_addr = addr
        self._prepare()


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    """A throwaway CA and a localhost certificate made with the openssl CLI (nginx only)."""
    d = tmp_path_factory.mktemp("testca")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=moat integration test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=localhost")
    (d / "leaf.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                "keyUsage=critical,digitalSignature\n")
    run("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "leaf.pem", "-days", "2", "-extfile", "leaf.ext")
    return {"ca": d / "ca.pem", "ca_key": d / "ca.key", "cert": d / "leaf.pem",
            "key": d / "leaf.key"}


SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                   "WARNING: ThreadSanitizer")


def _teardown(request, started):
    for p in started:
        p.stop()
    # A sanitizer report fails the test even if every assertion passed (run the suite with
    # an ASan+UBSan build and ASAN_OPTIONS=detect_leaks=1 to get them).
    reports = [p for p in started if any(m in tail(p.stderr_path, 1 << 20)
                                         for m in SANITIZER_MARKS)]
    if _failed(request) or reports:
        for p in started:
            print(f"\n===== {p.kind} in {p.dir} (exit {p.exit_code})\n{p.logs()}")
    if reports:
        pytest.fail(f"sanitizer report in {[str(p.stderr_path) for p in reports]}")


@pytest.fixture
def moat(tmp_path, request):
    """Factory: moat(upstream_addr, site="localhost", site_opts=(), use_config=True,
    extra_args=()) -> a started, ready MoatProxy (Moatfile, or SITE UPSTREAM arguments if
    use_config=False). Stopped with SIGTERM at teardown; logs printed if the test failed."""
    require_moat()
    started = []

    def make(upstream_addr, **kw):
        p = MoatProxy(tmp_path / f"moat{len(started)}", upstream_addr, **kw)
        started.append(p)
        return p.start()

    yield make
    _teardown(request, started)


@pytest.fixture
def proxy(tmp_path, request):
    """Factory: proxy(upstream_addr, moat_opts=(), moat_args=()) -> moat (with those site
    options and command-line arguments), or nginx when MOAT_TEST_TARGET=nginx."""
    if TARGET == "moat":
        require_moat()
    elif TARGET != "nginx":
        raise pytest.UsageError(f"MOAT_TEST_TARGET must be moat or nginx, not {TARGET!r}")
    started = []

    def make(upstream_addr, moat_opts=(), moat_args=()):
        d = tmp_path / f"{TARGET}{len(started)}"
        if TARGET == "nginx":
            p = NginxProxy(d, upstream_addr, request.getfixturevalue("test_ca"))
        else:
            p = MoatProxy(d, upstream_addr, site_opts=moat_opts, extra_args=moat_args)
        started.append(p)
        return p.start()

    yield make
    _teardown(request, started)
