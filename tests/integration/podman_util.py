"""Containers for the packaging and compose tests (test_packaging.py, test_compose.py).

podman runs as root with its own storage under the test cache (/var/cache/moat-tests), so
images and build layers survive between runs; the Debian bases come from the apt mirror
(tests/packaging/make-bases.sh), no registry is used. moat's image is built once per test
run from a staged copy of the checkout, whichever module asks first; builds take a lock
file, so two test runs on one machine never build at the same time.
"""

import fcntl
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from helpers import REPO

HERE = REPO / "tests" / "packaging"
CACHE = Path(os.environ.get("MOAT_TEST_CACHE", "/var/cache/moat-tests"))
SYSTEM_IMAGE = "localhost/moat-test-system:bookworm"
SLIM_IMAGE = "docker.io/library/debian:bookworm-slim"
MOAT_IMAGE = "localhost/moat:test"
BUILD_IMAGE = "localhost/moat-build:cache"
SOURCES = ["CMakeLists.txt", "include", "server", "http2", "acme", "storage", "packaging"]
# Names of what one test run creates (containers, networks, compose projects).
TAG = uuid.uuid4().hex[:8]
# netavark (with aardvark-dns) rather than CNI: containers on a network find each other by
# name, as under Docker (tests/packaging/containers.conf chooses it).
NETAVARK = "/usr/lib/podman/netavark"
AARDVARK = "/usr/lib/podman/aardvark-dns"


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

    def wrapper(self, directory):
        """An executable that is this podman (same storage), for tools that run `podman`
        themselves (podman-compose --podman-path). The environment still needs self.env."""
        path = Path(directory) / "podman"
        path.write_text("#!/bin/sh\nexec " + " ".join(self.base) + ' "$@"\n')
        path.chmod(0o755)
        return path

    def ip(self, name):
        """The container's address on its (one) network."""
        return self("inspect", name, "--format",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}").stdout.strip()

    def rm_all(self):
        # -v: the image's VOLUME /data gives each container an anonymous volume.
        for name in self.containers:
            self("rm", "-f", "-v", "-t", "0", name, check=False, timeout=60)
        self.containers = []


def skip_reason(*tools):
    """Why these tests cannot run here, or None."""
    if os.environ.get("MOAT_SKIP_PACKAGING"):
        return "MOAT_SKIP_PACKAGING is set"
    if os.geteuid() != 0:
        return "needs root (podman with its own storage, a booted systemd container)"
    for tool in ("podman", "runc", "mmdebstrap") + tools:
        if shutil.which(tool) is None:
            return f"{tool} is missing (packaging/deps.sh --test installs it)"
    for path in (NETAVARK, AARDVARK):
        if not os.access(path, os.X_OK):
            return (f"{path} is missing (packaging/deps.sh --test installs netavark and "
                    "aardvark-dns)")
    return None


def podman_with_bases():
    """A Podman with the Debian bases made (cached) and imported as images."""
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
    return p


def stage_sources():
    """The checkout's sources, staged without build folders, in a new temporary folder (the
    caller removes it): the .deb, install.sh and the image all build moat from these."""
    d = Path(tempfile.mkdtemp(prefix="moat-pkg-src."))
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, d / name, symlinks=True)
        elif src.exists():
            shutil.copy2(src, d / name)
    return d


def build_image(p, context, dockerfile, tag, target=None, timeout=900):
    """podman build with host networking (only the build's apt-get reaches the Debian
    mirror), never pulling. One build at a time on this machine (a lock file in the cache);
    the image the tag named before is removed once the new one is tagged, so the cached
    storage does not grow while the layers stay as the cache for the next run."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = p("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        args = ["build", "--pull=never", "--network=host", "--format", "docker", "-f",
                str(dockerfile), "-t", tag] + (["--target", target] if target else [])
        build = p(*args, str(context), timeout=timeout, check=False)
        new = p("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        assert build.returncode == 0 and new.returncode == 0, \
            build.stdout[-3000:] + build.stderr[-3000:]
        if old.returncode == 0 and old.stdout.strip() != new.stdout.strip():
            p("rmi", old.stdout.strip(), check=False)
    return tag


_built = set()


def moat_image(p):
    """localhost/moat:test from packaging/docker/Dockerfile and the checkout, built once per
    test run. The build stage is tagged too (localhost/moat-build:cache): its apt layer, the
    slow part, stays cached for the next run."""
    if MOAT_IMAGE not in _built:
        sources = stage_sources()
        try:
            dockerfile = sources / "packaging" / "docker" / "Dockerfile"
            build_image(p, sources, dockerfile, BUILD_IMAGE, target="build")
            build_image(p, sources, dockerfile, MOAT_IMAGE)
        finally:
            shutil.rmtree(sources, ignore_errors=True)
        _built.add(MOAT_IMAGE)
    return MOAT_IMAGE
