"""What the kernel caches of uploads/ (entries, attributes, *missing* names) stays true.

uploads/ lets the kernel keep entries, attributes and negative entries (a name is
missing) for a minute (``uploads/_nodes.py``, "What the kernel may cache"). These tests
change the tree in every way a client can right after the kernel cached the opposite,
and check that the next look shows the change at once; and that a file put into the
store while the agent was down is there after the restart.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

import pytest

from conftest import wait_for

FAST = """
settle_seconds = 0.6
checkpoint_seconds = 0.5
store_reserve_bytes = 0
"""


def missing(path) -> bool:
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    return False


def xattr(path, key: str) -> str:
    return os.getxattr(path, f"user.fsagent.{key}").decode()


@pytest.fixture
def fast(agent_factory):
    return agent_factory(config=FAST).start()


def test_a_name_seen_missing_appears_at_once_however_it_is_made(fast, tmp_path):
    up = fast.uploads

    def renamed(p):
        (up / "source.bin").write_bytes(b"r")
        os.rename(up / "source.bin", p)

    def dir_renamed(p):
        (up / "srcdir").mkdir()
        os.rename(up / "srcdir", p)

    made = {
        "created": lambda p: p.write_bytes(b"x"),
        "excl": lambda p: os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)),
        "dir": lambda p: p.mkdir(),
        "link": lambda p: p.symlink_to("target"),
        "fifo": lambda p: os.mkfifo(p),
        "renamed": renamed,
        "dir-renamed": dir_renamed,
    }
    for name, make in made.items():
        path = up / name
        assert missing(path) and missing(path), name  # asked twice: remembered as missing
        make(path)
        assert not missing(path), name
        assert name in os.listdir(up)
    # Removed again, through every route: gone at once, and back at once when remade.
    for name in made:
        path = up / name
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
        assert missing(path), name
    (up / "created").write_bytes(b"again")
    assert (up / "created").read_bytes() == b"again"
    # A directory's children follow it when it is renamed over a name seen missing.
    (up / "d").mkdir()
    (up / "d" / "f").write_bytes(b"in d")
    assert missing(up / "e" / "f") and missing(up / "e")
    os.rename(up / "d", up / "e")
    assert (up / "e" / "f").read_bytes() == b"in d"
    assert missing(up / "d" / "f") and missing(up / "d")


def test_attributes_cached_by_the_kernel_follow_every_change(fast):
    path = fast.uploads / "grow.bin"
    first = open(path, "wb", buffering=0)
    first.write(b"a" * 4096)
    st = os.stat(path)  # cached for a minute from here on...
    assert st.st_size == 4096
    with open(path, "r+b", buffering=0) as second:  # ...but every change is seen at once
        second.seek(0, os.SEEK_END)
        second.write(b"b" * 4096)
    assert os.stat(path).st_size == 8192
    assert os.fstat(first.fileno()).st_size == 8192
    first.write(b"c" * 100)  # the first descriptor's offset: 4096
    first.close()
    assert os.stat(path).st_size == 8192
    os.truncate(path, 10)
    assert os.stat(path).st_size == 10
    os.chmod(path, 0o600)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    os.utime(path, ns=(1_000_000_000, 2_000_000_000))
    assert os.stat(path).st_mtime_ns == 2_000_000_000
    with open(path, "ab") as f:
        f.write(b"tail")
    st = os.stat(path)
    assert st.st_size == 14 and st.st_mtime_ns != 2_000_000_000
    assert path.read_bytes() == b"a" * 10 + b"tail"
    # A directory's size, times and link count follow its entries.
    d = fast.uploads / "dir"
    d.mkdir()
    nlink = os.stat(d).st_nlink
    (d / "sub").mkdir()
    assert os.stat(d).st_nlink == nlink + 1
    (d / "sub").rmdir()
    assert os.stat(d).st_nlink == nlink


def test_a_file_put_into_the_store_while_the_agent_was_down_is_there(agent_factory):
    agent = agent_factory(config=FAST).start()
    name = agent.uploads / "later.bin"
    assert missing(name)  # this mount remembers it as missing...
    agent.stop()
    backing = agent.state / "data" / "uploads" / "later.bin"
    backing.write_bytes(b"put here by hand")
    agent.start()  # ...the next mount does not
    assert name.read_bytes() == b"put here by hand"
    assert "later.bin" in os.listdir(agent.uploads)


def test_many_small_writes_then_a_large_one_hash_right(fast):
    # Small writes are hashed inline; the first write too large for that starts the
    # hasher's queue and consumer mid-stream; small writes after it queue behind it.
    path = fast.uploads / "mixed.bin"
    pieces = [os.urandom(100) for _ in range(500)] + [os.urandom(3 << 20)] + \
        [os.urandom(1000) for _ in range(200)]
    with open(path, "wb", buffering=0) as f:
        for piece in pieces:
            assert f.write(piece) == len(piece)
    expected = hashlib.sha256(b"".join(pieces)).hexdigest()
    wait_for(lambda: xattr(path, "state") == "complete", what="mixed.bin complete")
    assert xattr(path, "sha256") == expected
    assert fast.status()["uploads"]["rehashed"] == 0  # hashed from the stream


def test_rsync_into_a_tree_it_created_sees_its_own_files(fast, tmp_path):
    # rsync's generator stats every name before the receiver creates it; a second run
    # right after must find every file the first one made (entries cached as present).
    src = tmp_path / "src"
    for d in range(3):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(20):
            (src / f"d{d}" / f"f{i}").write_bytes(os.urandom(512))
    for _ in range(2):
        out = subprocess.run(["rsync", "-a", "--stats", f"{src}/", fast.uploads / "t"],
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert "Number of regular files transferred: 0" in out.stdout
    for d in range(3):
        for i in range(20):
            rel = f"d{d}/f{i}"
            assert (fast.uploads / "t" / rel).read_bytes() == (src / rel).read_bytes()
