"""What moat does with a damaged certificate store: 4 KiB of garbage in the middle of moat.db
(a table page, not the header) is refused at start with a message that names the file and
what to do, and the file is left byte for byte as it was."""
import hashlib
import os
import shutil
import subprocess
import time

import pytest

from conftest import MOAT_BIN, MoatProxy, _teardown, require_moat


pytestmark = pytest.mark.moat_only

PAGE = 4096


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damage_in_the_middle_of_the_store_is_refused_untouched(moat, upstream):
    p = moat(upstream.addr)
    with p.client() as c:
        assert c.get(p.url("/health")).status_code == 200
    p.stop()
    db = p.data / "moat.db"
    data = bytearray(db.read_bytes())
    assert len(data) >= 3 * PAGE, f"moat.db has {len(data) // PAGE} pages"
    # The last page holds rows (the store only grows at the end); the header stays intact.
    at = len(data) - PAGE
    data[at:at + PAGE] = bytes((i * 13 + 5) & 0xff for i in range(PAGE))
    db.write_bytes(bytes(data))
    before = sha256(db)

    try:
        cp = subprocess.run(p.argv(), capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"moat started on a damaged store (still running after 10 s): {e.stderr}")
    assert cp.returncode == 3, (cp.returncode, cp.stderr[-2000:])
    assert f"{db} is damaged" in cp.stderr, cp.stderr[-2000:]
    assert "restore it from a backup, or move it aside" in cp.stderr
    assert sha256(db) == before  # never overwritten
    assert not (p.data / "moat.db-wal").exists() or (p.data / "moat.db-wal").stat().st_size == 0

    # Moved aside, moat starts fresh (a new internal CA) and serves again.
    db.rename(p.data / "moat.db.damaged")
    p.start()
    with p.client() as c:
        assert c.get(p.url("/health")).status_code == 200


# --- A disk that fills up or turns read-only under a running moat ----------------------------
#
# The data folder is a small ext4 file system on a loop device, mounted in a private mount
# namespace the test makes for the moat process alone (unshare --mount; the loop device is
# freed when the namespace ends). The test reaches into that namespace with nsenter to fill
# the disk, or to make ext4 report an error (errors=remount-ro, as a failing disk would), and
# reads the image afterwards, so the host's own mounts are never touched.

IMAGE_MIB = 8


class OnOwnDisk(MoatProxy):
    """moat with its --data folder on its own ext4 image (self.image)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.image = self.dir / "data.ext4"

    def argv(self):
        script = ('mount -o loop,errors=remount-ro "$0" "$1" && chmod 0700 "$1" && '
                  'shift && exec "$@"')
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                str(self.image), str(self.data), *super().argv()]

    def inside(self, *cmd, check=True):
        """Run cmd in moat's mount namespace (where its data folder is mounted)."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", *cmd], check=check,
                              capture_output=True, text=True, timeout=30)

    def _after_ready(self):
        pem = self.inside(MOAT_BIN, "ca-root", "--data", str(self.data)).stdout
        assert "BEGIN CERTIFICATE" in pem, pem
        self.ca.write_text(pem)

    def write_sites(self, *names):
        """Serve these names (each to the upstream) from now on, and reload."""
        self.sites = names
        self._prepare()
        self.reload()

    def _prepare(self):
        if not self.image.exists():
            subprocess.run(["truncate", "-s", f"{IMAGE_MIB}M", str(self.image)], check=True)
            subprocess.run(["mkfs.ext4", "-q", str(self.image)], check=True)
        names = getattr(self, "sites", [self.site])
        self.config.write_text("".join(f"{n} {self.upstream_addr}\n" for n in names))


@pytest.fixture
def on_own_disk(tmp_path, request):
    require_moat()
    if not shutil.which("mkfs.ext4") or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs mkfs.ext4 and loop devices")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode()[-200:]}")
    started = []

    def make(upstream_addr):
        p = OnOwnDisk(tmp_path / f"moat{len(started)}", upstream_addr)
        started.append(p)
        return p.start()

    yield make
    _teardown(request, started)


def served(p, name):
    """HTTP status moat answers for https://NAME/health, checked against its CA."""
    cp = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time",
                         "5", "--cacert", str(p.ca), "--resolve",
                         f"{name}:{p.https_port}:127.0.0.1", f"https://{name}:{p.https_port}/health"],
                        capture_output=True, text=True)
    return cp.stdout


def wait_log(p, text, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in p.stderr_path.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def test_full_disk_keeps_serving_and_recovers_when_space_returns(on_own_disk, upstream):
    p = on_own_disk(upstream.addr)
    assert served(p, "localhost") == "200"
    filler = p.data / "filler"
    # dd stops at ENOSPC (exit 1): every block moat could have used is now taken.
    p.inside("dd", "if=/dev/zero", f"of={filler}", "bs=64k", check=False)
    assert "100%" in p.inside("df", "--output=pcent", str(p.data)).stdout

    # Enough new sites that their certificates outgrow the space SQLite's log already holds
    # (after a checkpoint it writes over its old blocks, which needs no new space).
    names = [f"s{i}.localhost" for i in range(40)]
    p.write_sites("localhost", *names)
    assert wait_log(p, "is full"), p.logs()
    log = p.stderr_path.read_text()
    assert "free some space; still serving the previous configuration" in log
    assert all(served(p, "localhost") == "200" for _ in range(20))  # serving continues
    assert served(p, names[-1]) != "200"  # the sites whose certificates could not be kept

    p.inside("rm", str(filler))
    p.reload()
    assert wait_log(p, "now serving 41 site(s)"), p.logs()
    assert served(p, names[-1]) == "200"
    assert names[-1] in p.inside(MOAT_BIN, "certs", "--data", str(p.data)).stdout
    check = p.inside("python3", "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1])"
                     ".execute('pragma integrity_check').fetchone()[0])", str(p.data / "moat.db"))
    assert check.stdout.strip() == "ok"


def test_disk_turned_read_only_keeps_serving_then_restart_recovers(on_own_disk, upstream):
    p = on_own_disk(upstream.addr)
    ca_before = p.ca.read_text()
    loop = os.path.basename(p.inside("findmnt", "-no", "SOURCE", str(p.data)).stdout.strip())
    # What a failing disk does under errors=remount-ro: ext4 turns the file system read-only
    # beneath the open database.
    p.inside("sh", "-c", f"echo 1 > /sys/fs/ext4/{loop}/trigger_fs_error")
    touch = p.inside("touch", str(p.data / "probe"), check=False)
    assert "Read-only file system" in touch.stderr, touch

    p.write_sites("localhost", "b.localhost")
    assert wait_log(p, "still serving the previous configuration"), p.logs()
    line = [ln for ln in p.stderr_path.read_text().splitlines() if "b.localhost" in ln][-1]
    assert "read-only" in line, line
    assert all(served(p, "localhost") == "200" for _ in range(20))

    # The operator repairs the disk (fsck) and restarts moat: same CA, nothing lost, the new
    # site issued.
    assert p.stop() == 0
    fsck = subprocess.run(["e2fsck", "-fy", str(p.image)], capture_output=True, text=True)
    assert fsck.returncode in (0, 1), fsck.stdout + fsck.stderr  # 1: errors corrected
    p.start()
    assert p.ca.read_text() == ca_before
    assert served(p, "localhost") == "200" and served(p, "b.localhost") == "200"
