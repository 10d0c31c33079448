"""What moat does with a damaged certificate store: 4 KiB of garbage in the middle of moat.db
(a table page, not the header) is refused at start with a message that names the file and
what to do, and the file is left byte for byte as it was."""
import hashlib
import subprocess

import pytest


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
