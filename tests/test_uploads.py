"""uploads/ end to end: a real agent, a real mount, the real tools."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import PATIENCE, wait_for

FAST = """
settle_seconds = 0.6
checkpoint_seconds = 0.5
store_reserve_bytes = 0
"""


def xattr(path: Path, key: str) -> str:
    return os.getxattr(path, f"user.fsagent.{key}").decode()


def state(path: Path) -> str:
    return xattr(path, "state")


def wait_state(path: Path, wanted: str, timeout: float = PATIENCE) -> None:
    wait_for(lambda: state(path) == wanted, timeout, f"{path.name} to be {wanted}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def listing(agent) -> list[dict]:
    return json.loads((agent.mount / "uploads.json").read_text())


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, argv)), capture_output=True, text=True, **kw)


@pytest.fixture
def fast(agent_factory):
    return agent_factory(config=FAST).start()


@pytest.fixture
def source(tmp_path) -> Path:
    """A small tree with the things cp/rsync/tar must carry: modes, times, a symlink."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "empty").mkdir()
    for i, rel in enumerate(["top.bin", "a/one.bin", "a/b/two.bin", "a/b/three.txt"]):
        p = src / rel
        p.write_bytes(os.urandom(1000 + 70_000 * i))
        os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_987_654_321 + i))
    os.chmod(src / "a/b/three.txt", 0o640)
    os.symlink("b/two.bin", src / "a/link")
    os.setxattr(src / "top.bin", "user.origin", b"microscope-3")
    # Old directory times too: rsync treats times within the same second as equal, so a
    # just-made source dir would not prove that directory times are carried.
    for d in (src / "a" / "link", src / "a" / "b", src / "a", src / "empty", src):
        os.utime(d, ns=(1_500_000_000_000_000_000, 1_500_000_000_111_111_111),
                 follow_symlinks=False)
    return src


def same_tree(src: Path, dst: Path, *, xattrs: bool = False) -> None:
    for p in sorted(src.rglob("*")):
        q = dst / p.relative_to(src)
        a, b = os.lstat(p), os.lstat(q)
        assert (a.st_mode, a.st_mtime_ns) == (b.st_mode, b.st_mtime_ns), q
        if p.is_symlink():
            assert os.readlink(p) == os.readlink(q)
        elif p.is_file():
            assert a.st_size == b.st_size and sha256(p) == sha256(q), q
            if xattrs:
                assert os.getxattr(q, "user.origin") == os.getxattr(p, "user.origin") \
                    if "user.origin" in os.listxattr(p) else True


def all_complete(agent, root: Path) -> None:
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for p in files:
        wait_state(p, "complete")
        assert xattr(p, "sha256") == sha256(p)


# -- 1. a real file tree ---------------------------------------------------------------------


def test_tree_operations(fast):
    up = fast.uploads
    (up / "d").mkdir()
    fd = os.open(up / "d/f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.pwrite(fd, b"world", 6)
    os.pwrite(fd, b"hello ", 0)
    with pytest.raises(FileExistsError):
        os.open(up / "d/f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    assert (up / "d/f").read_bytes() == b"hello world"  # readable while still open
    os.close(fd)
    os.truncate(up / "d/f", 5)
    assert (up / "d/f").read_bytes() == b"hello"
    os.chmod(up / "d/f", 0o600)
    os.chown(up / "d/f", 1234, 4321)
    os.utime(up / "d/f", ns=(1_000_000_001, 1_500_000_000_123_456_789))
    st = os.stat(up / "d/f")
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o600, 1234, 4321)
    assert st.st_mtime_ns == 1_500_000_000_123_456_789 and st.st_atime_ns == 1_000_000_001
    os.symlink("f", up / "d/l")
    assert os.readlink(up / "d/l") == "f" and (up / "d/l").read_bytes() == b"hello"
    os.setxattr(up / "d/f", "user.note", b"\x00binary\xff")
    assert os.getxattr(up / "d/f", "user.note") == b"\x00binary\xff"
    assert "user.note" in os.listxattr(up / "d/f")
    with pytest.raises(OSError) as e:
        os.setxattr(up / "d/f", "trusted.x", b"1")
    assert e.value.errno == errno.ENOTSUP
    with pytest.raises(OSError) as e:
        os.link(up / "d/f", up / "d/hard")
    assert e.value.errno == errno.EPERM
    (up / "d/g").write_bytes(b"other")
    os.rename(up / "d/g", up / "d/f")  # replaces the target
    assert (up / "d/f").read_bytes() == b"other"
    assert sorted(os.listdir(up / "d")) == ["f", "l"]
    with pytest.raises(OSError) as e:
        os.rmdir(up / "d")
    assert e.value.errno == errno.ENOTEMPTY
    os.unlink(up / "d/l")
    os.unlink(up / "d/f")
    os.rmdir(up / "d")
    assert os.listdir(up) == []
    # Everything lives in the backing tree, exactly.
    assert os.listdir(fast.state / "data" / "uploads") == []


def test_cp_and_cp_a(fast, source):
    up = fast.uploads
    subprocess.run(["cp", source / "top.bin", up / "plain.bin"], check=True)
    subprocess.run(["cp", "-a", source, up / "tree"], check=True)
    same_tree(source, up / "tree")
    all_complete(fast, up)
    assert run("sha256sum", up / "plain.bin").stdout.split()[0] == sha256(source / "top.bin")
    assert os.getxattr(up / "tree/top.bin", "user.origin") == b"microscope-3"


def test_rsync_a_and_a_rerun_transfers_nothing(fast, source):
    up = fast.uploads
    first = run("rsync", "-a", f"{source}/", up / "r")
    assert first.returncode == 0, first.stderr
    same_tree(source, up / "r")
    all_complete(fast, up / "r")
    again = run("rsync", "-ai", f"{source}/", up / "r")
    assert again.returncode == 0, again.stderr
    assert again.stdout == ""  # size and mtime are exact: nothing to send
    # rsync -aX carries user.* xattrs, and re-runs cleanly (status attrs are derived).
    x = run("rsync", "-aX", f"{source}/", up / "x")
    assert x.returncode == 0, x.stderr
    assert os.getxattr(up / "x/top.bin", "user.origin") == b"microscope-3"
    all_complete(fast, up / "x")
    again = run("rsync", "-aXi", f"{source}/", up / "x")
    assert again.returncode == 0, again.stderr
    # No data is sent again (rsync may itemize the derived user.fsagent.* attributes it
    # tried to remove, as "x" changes, but never re-sends a file: no ">f" lines).
    assert not [line for line in again.stdout.splitlines() if not line.startswith(".")], \
        again.stdout
    # No rsync temp file ever became a task.
    paths = {t["path"] for t in listing(fast)}
    assert not any("/." in "/" + p for p in paths), paths


def test_tar_x_and_copytree(fast, source, tmp_path):
    up = fast.uploads
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(source, arcname="t")
    (up / "untar").mkdir()
    (tmp_path / "plain").mkdir()
    subprocess.run(["tar", "-xpf", archive, "-C", up / "untar"], check=True)
    subprocess.run(["tar", "-xpf", archive, "-C", tmp_path / "plain"], check=True)
    same_tree(tmp_path / "plain/t", up / "untar/t")  # tar keeps whole seconds only
    shutil.copytree(source, up / "ct", symlinks=True)
    same_tree(source, up / "ct")
    all_complete(fast, up)


# -- 2/3. tasks and completion ---------------------------------------------------------------


def test_task_states_and_new_versions(fast):
    up = fast.uploads
    f = up / "s.bin"
    with open(f, "wb") as out:
        out.write(b"x" * 1000)
        out.flush()
        assert state(f) == "receiving"
        task = xattr(f, "task")
        assert len(task) == 32
    assert state(f) in ("partial", "verifying", "complete")
    wait_state(f, "complete")
    assert xattr(f, "sha256") == hashlib.sha256(b"x" * 1000).hexdigest()
    with open(f, "ab") as out:  # reopening a complete file: a new version
        out.write(b"y")
        assert state(f) == "receiving"
    wait_state(f, "complete")
    assert xattr(f, "task") == task
    assert xattr(f, "sha256") == hashlib.sha256(b"x" * 1000 + b"y").hexdigest()
    os.rename(f, up / "moved.bin")  # the task moves with the file
    assert xattr(up / "moved.bin", "task") == task
    assert [t["path"] for t in listing(fast) if t["taskID"] == task] == ["moved.bin"]
    os.unlink(up / "moved.bin")  # unlink ends the task and its data
    assert not any(t["taskID"] == task for t in listing(fast))
    assert not (fast.state / "data/uploads/moved.bin").exists()


def test_rsync_temp_names_and_partial_renames(fast):
    up = fast.uploads
    temp = up / ".data.bin.Ab12Cd"
    temp.write_bytes(b"z" * 5000)
    assert "user.fsagent.task" not in os.listxattr(temp)
    assert listing(fast) == []
    (up / ".rsync-partial").mkdir()
    (up / ".rsync-partial/p.bin").write_bytes(b"p")
    assert "user.fsagent.task" not in os.listxattr(up / ".rsync-partial/p.bin")
    # rsync's interrupted --partial: renamed into place with mtime 0. Stays partial.
    os.utime(temp, ns=(0, 0))
    os.rename(temp, up / "data.bin")
    time.sleep(2.0)  # > settle_seconds
    assert state(up / "data.bin") == "partial"
    # A temp file renamed into place with a real mtime is complete.
    (up / ".other.bin.Zz99Yy").write_bytes(b"o" * 10)
    os.rename(up / ".other.bin.Zz99Yy", up / "other.bin")
    wait_state(up / "other.bin", "complete")
    # Resuming the held one (--append-verify writes, then sets the real mtime).
    with open(up / "data.bin", "ab") as f:
        f.write(b"z" * 5000)
    os.utime(up / "data.bin", ns=(1, 1_700_000_000_000_000_000))
    wait_state(up / "data.bin", "complete")
    assert xattr(up / "data.bin", "sha256") == hashlib.sha256(b"z" * 10000).hexdigest()


# -- 4. client hashes -------------------------------------------------------------------------


def test_client_hash_xattr_match_and_mismatch(agent_factory):
    # No settling here, not even within the longest wait below: only a hash completes.
    agent = agent_factory(config=FAST.replace("0.6", "3600")).start()
    up = agent.uploads
    good, bad = os.urandom(300_000), os.urandom(300_000)
    (up / "ok.bin").touch()
    os.setxattr(up / "ok.bin", "user.fsagent.sha256", hashlib.sha256(good).hexdigest().encode())
    os.setxattr(up / "ok.bin", "user.fsagent.md5", hashlib.md5(good).hexdigest().encode())
    (up / "ok.bin").write_bytes(good)
    wait_state(up / "ok.bin", "complete")
    (up / "bad.bin").touch()
    expected = hashlib.sha256(good).hexdigest()
    os.setxattr(up / "bad.bin", "user.fsagent.sha256", expected.encode())
    (up / "bad.bin").write_bytes(bad)
    wait_state(up / "bad.bin", "failed")
    error = xattr(up / "bad.bin", "error")
    assert "bad.bin" in error and "sha256" in error and expected in error
    assert hashlib.sha256(bad).hexdigest() in error
    assert (up / "bad.bin").read_bytes() == bad  # the data stays
    (up / "bad.bin").write_bytes(good)  # a re-send repairs it
    wait_state(up / "bad.bin", "complete")
    assert xattr(up / "bad.bin", "error") == ""
    with pytest.raises(OSError) as e:
        os.setxattr(up / "ok.bin", "user.fsagent.sha256", b"not-hex")
    assert e.value.errno == errno.EINVAL
    with pytest.raises(OSError) as e:
        os.setxattr(up / "ok.bin", "user.fsagent.state", b"complete")
    assert e.value.errno == errno.EPERM


def test_manifests_before_and_after(agent_factory, tmp_path):
    agent = agent_factory(config=FAST.replace("0.6", "3600")).start()  # no settling
    up = agent.uploads
    a, b, c = os.urandom(70_000), os.urandom(80_000), os.urandom(90_000)
    (up / "m").mkdir()
    # Before the data: SHA256SUMS names a.bin.
    (up / "m/SHA256SUMS").write_text(f"{hashlib.sha256(a).hexdigest()}  a.bin\n")
    (up / "m/a.bin").write_bytes(a)
    wait_state(up / "m/a.bin", "complete")
    # After the data: b.bin waits (no settling in this config) until b.bin.sha1 arrives.
    (up / "m/b.bin").write_bytes(b)
    time.sleep(1.0)
    assert state(up / "m/b.bin") == "partial"
    src = tmp_path / "b.bin.sha1"
    src.write_text(f"{hashlib.sha1(b).hexdigest()}  b.bin\n")
    subprocess.run(["cp", src, up / "m/b.bin.sha1"], check=True)
    wait_state(up / "m/b.bin", "complete")
    # A manifest arriving after completion with a different hash fails the upload.
    (up / "m/c.bin").write_bytes(c)
    (up / "m/c.bin.md5").write_text(f"{hashlib.md5(c).hexdigest()}\n")
    wait_state(up / "m/c.bin", "complete")
    (up / "m/MD5SUMS").write_text(f"{hashlib.md5(b'other').hexdigest()}  a.bin\n")
    wait_state(up / "m/a.bin", "failed")
    error = xattr(up / "m/a.bin", "error")
    assert "m/a.bin" in error and "md5" in error and "MD5SUMS" in error
    assert hashlib.md5(a).hexdigest() in error
    # md5sum -c through the mount agrees the data itself is intact.
    out = run("sha256sum", "-c", "SHA256SUMS", cwd=up / "m")
    assert out.returncode == 0, out.stdout + out.stderr


# -- 5. declared size, space -------------------------------------------------------------------


def test_declared_size_progress_and_up_front_space_check(fast):
    up = fast.uploads
    f = up / "sized.bin"
    f.touch()
    os.setxattr(f, "user.fsagent.size", b"400000")
    assert xattr(f, "progress") == "0"
    with open(f, "wb") as out:
        out.write(b"a" * 100_000)
        out.flush()
        assert xattr(f, "progress") == "25"
        assert xattr(f, "size") == "400000"
    time.sleep(1.5)  # well past settle_seconds: a declared size is authoritative
    assert state(f) == "partial"
    with open(f, "ab") as out:
        out.write(b"a" * 300_000)
    wait_state(f, "complete")
    free = os.statvfs(fast.state).f_bavail * os.statvfs(fast.state).f_frsize
    (up / "huge.bin").touch()
    with pytest.raises(OSError) as e:
        os.setxattr(up / "huge.bin", "user.fsagent.size", str(free + 2**30).encode())
    assert e.value.errno == errno.ENOSPC
    assert "user.fsagent.size" not in os.listxattr(up / "huge.bin")
    entry = [t for t in listing(fast) if t["path"] == "sized.bin"][0]
    assert entry["size"] == 400000 and entry["progress"] == 100


@pytest.fixture
def small_store(tmp_path):
    store = tmp_path / "small"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", store], check=True)
    try:
        yield store
    finally:
        subprocess.run(["umount", "-l", store], check=False)


def test_enospc_on_a_small_store_then_resume(agent_factory, small_store, tmp_path):
    agent = agent_factory(state=small_store / "state", config="""
settle_seconds = 0.6
checkpoint_seconds = 0.5
store_reserve_bytes = 4194304
""").start()
    up = agent.uploads
    # Up front: a declaration the store cannot hold fails at once.
    (up / "big.bin").touch()
    with pytest.raises(OSError) as e:
        os.setxattr(up / "big.bin", "user.fsagent.size", str(60 * 2**20).encode())
    assert e.value.errno == errno.ENOSPC
    os.unlink(up / "big.bin")
    filler = up / "filler.bin"
    filler.write_bytes(os.urandom(20 * 2**20))
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(30 * 2**20))
    out = run("cp", src, up / "data.bin")
    assert out.returncode != 0 and "No space left" in out.stderr
    present = os.stat(up / "data.bin").st_size
    assert 0 < present < 30 * 2**20
    with open(src, "rb") as s:  # what is there is correct: nothing was corrupted
        assert (up / "data.bin").read_bytes() == s.read(present)
    assert agent.proc.poll() is None
    os.unlink(filler)  # space freed: the upload resumes
    out = run("rsync", "--inplace", "--append-verify", src, up / "data.bin")
    assert out.returncode == 0, out.stderr
    wait_state(up / "data.bin", "complete")
    assert xattr(up / "data.bin", "sha256") == sha256(src)


def test_enospc_is_returned_by_the_write_that_does_not_fit(agent_factory, small_store):
    # Large writes are acknowledged before they reach the backing file (write-behind),
    # so the space check must count what is still queued: the failing call is write(),
    # not a later close(), and every byte acknowledged is there.
    agent = agent_factory(state=small_store / "state", config=FAST.replace(
        "store_reserve_bytes = 0", "store_reserve_bytes = 4194304")).start()
    chunk = os.urandom(2**20)
    fd = os.open(agent.uploads / "fill.bin", os.O_WRONLY | os.O_CREAT, 0o644)
    written = 0
    with pytest.raises(OSError) as e:
        while True:
            written += os.write(fd, chunk)
    assert e.value.errno == errno.ENOSPC and written > 30 * 2**20
    os.close(fd)  # nothing left to report
    assert os.stat(agent.uploads / "fill.bin").st_size == written
    data = (agent.uploads / "fill.bin").read_bytes()
    assert all(data[i:i + len(chunk)] == chunk[:len(data) - i]
               for i in range(0, len(data), len(chunk)))


def test_a_failed_queued_write_fails_the_copy_and_leaves_a_whole_prefix(agent_factory,
                                                                        tmp_path):
    # A write the backing filesystem refuses after we acknowledged it (here: the agent's
    # RLIMIT_FSIZE, which the space check cannot see, like a disk filled behind our back)
    # is reported by the next write or by close(), so cp exits non-zero; the file is cut
    # back to where it is whole and resumes once the cause is gone.
    limit = 10 * 2**20 + 300_000
    agent = agent_factory(config=FAST)
    plain_argv = agent.argv
    agent.argv = lambda: ["prlimit", f"--fsize={limit}", "--"] + plain_argv()
    agent.start()
    src = tmp_path / "data.bin"
    src.write_bytes(os.urandom(24 * 2**20))
    dst = agent.uploads / "data.bin"
    out = run("cp", src, dst)
    assert out.returncode != 0 and "File too large" in out.stderr, out.stderr
    assert agent.proc.poll() is None
    present = os.stat(dst).st_size
    assert 0 < present <= limit
    assert int(xattr(dst, "offset")) == present
    with open(src, "rb") as s:
        assert dst.read_bytes() == s.read(present)
    agent.stop()
    agent.argv = plain_argv
    agent.start()
    out = run("rsync", "--inplace", "--append-verify", src, dst)
    assert out.returncode == 0, out.stderr
    wait_state(dst, "complete")
    assert xattr(dst, "sha256") == sha256(src)


def test_out_of_order_large_writes_are_read_back_and_verified(fast):
    # Pieces larger than the inline limit go through the write-behind queue: reads and
    # stat see them at once, and an out-of-order stream falls back to re-hashing.
    pieces = [os.urandom(2**20) for _ in range(6)]
    whole = b"".join(pieces)
    path = fast.uploads / "ooo.bin"
    rehashed = fast.status()["uploads"]["rehashed"]
    path.touch()
    os.setxattr(path, "user.fsagent.size", str(len(whole)).encode())
    fd = os.open(path, os.O_WRONLY)
    reader = os.open(path, os.O_RDONLY)
    try:
        for i in reversed(range(len(pieces))):
            assert os.pwrite(fd, pieces[i], i * 2**20) == 2**20
            assert os.pread(reader, 2**20, i * 2**20) == pieces[i]
            assert os.fstat(reader).st_size == len(whole)
    finally:
        os.close(reader)
        os.close(fd)
    wait_state(path, "complete")
    assert xattr(path, "sha256") == hashlib.sha256(whole).hexdigest()
    assert fast.status()["uploads"]["rehashed"] == rehashed + 1


# -- 6. crashes ---------------------------------------------------------------------------------


CRASHY = """
settle_seconds = 0.6
checkpoint_seconds = 0.3
checkpoint_bytes = 1048576
store_reserve_bytes = 0
"""


def test_kill9_mid_rsync_then_append_verify_is_byte_identical(agent_factory, tmp_path):
    agent = agent_factory(config=CRASHY).start()
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(24 * 2**20))
    dst = agent.uploads / "big.bin"
    rsync = subprocess.Popen(["rsync", "--inplace", "--bwlimit=6000", src, dst],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for(lambda: dst.exists() and os.stat(dst).st_size > 6 * 2**20, what="rsync progress")
    # Kill only once a checkpoint taken after that has committed: there must be something
    # to resume from. A checkpoint is counted once its data is synced, before its record
    # commits, and they run one at a time: so two more counted means one more committed.
    counted = agent.status()["uploads"]["checkpoints"]
    wait_for(lambda: agent.status()["uploads"]["checkpoints"] >= counted + 2,
             what="a checkpoint of the first 6 MiB")
    agent.kill9()
    rsync.wait(PATIENCE)
    backing = agent.state / "data/uploads/big.bin"
    before_restart = os.stat(backing).st_size
    agent.start()
    assert agent.status()["previous_run_clean"] is False
    resumed = os.stat(dst).st_size
    assert 0 < resumed <= before_restart  # cut back to the last checkpoint
    entry = [t for t in listing(agent) if t["path"] == "big.bin"][0]
    assert entry["state"] == "partial" and entry["offset"] == resumed
    with open(src, "rb") as s:
        assert dst.read_bytes() == s.read(resumed)
    out = run("rsync", "--partial", "--append-verify", "--stats", src, dst)
    assert out.returncode == 0, out.stderr
    assert sha256(dst) == sha256(src)
    wait_state(dst, "complete")
    assert xattr(dst, "sha256") == sha256(src)


def test_interrupted_rsync_partial_then_kill9_then_resume(agent_factory, tmp_path):
    agent = agent_factory(config=CRASHY.replace("settle_seconds = 0.6",
                                                "settle_seconds = 3600")).start()
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(16 * 2**20))
    dst = agent.uploads / "p.bin"
    rsync = subprocess.Popen(["rsync", "--partial", "--bwlimit=4000", src, dst],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    temps = lambda: [p for p in agent.uploads.iterdir() if p.name.startswith(".p.bin.")]  # noqa: E731
    wait_for(lambda: temps() and os.stat(temps()[0]).st_size > 4 * 2**20, what="transfer")
    rsync.send_signal(signal.SIGINT)  # --partial: the temp file is renamed into place
    rsync.wait(PATIENCE)
    wait_for(lambda: dst.exists(), what="partial file in place")
    time.sleep(1.0)
    assert state(dst) == "partial"  # no real mtime was set on it: not a finished transfer
    agent.kill9()
    agent.start()
    assert state(dst) == "partial"
    assert 0 <= os.stat(dst).st_size < 16 * 2**20
    os.setxattr(dst, "user.fsagent.size", str(16 * 2**20).encode())
    out = run("rsync", "--partial", "--append-verify", src, dst)
    assert out.returncode == 0, out.stderr
    assert sha256(dst) == sha256(src)
    wait_state(dst, "complete")


def test_clean_stop_checkpoints_everything(agent_factory):
    agent = agent_factory(config=FAST.replace("checkpoint_seconds = 0.5",
                                              "checkpoint_seconds = 60")).start()
    f = agent.uploads / "open.bin"
    data = os.urandom(3 * 2**20)
    out = open(f, "wb")
    out.write(data)
    out.flush()
    agent.stop()
    with contextlib.suppress(OSError):  # the mount is gone: close() may report ENOTCONN
        out.close()
    agent.start()
    assert agent.status()["previous_run_clean"] is True
    assert f.read_bytes() == data
    assert state(f) in ("partial", "verifying", "complete")
    wait_state(f, "complete")


# -- 8/9/10. per-file state, the list, the import hand-off ------------------------------------


def test_xattrs_and_uploads_json(fast):
    up = fast.uploads
    (up / "j.bin").write_bytes(b"j" * 10)
    wait_state(up / "j.bin", "complete")
    names = set(os.listxattr(up / "j.bin"))
    assert {"user.fsagent.task", "user.fsagent.state", "user.fsagent.offset",
            "user.fsagent.progress", "user.fsagent.sha256", "user.fsagent.job",
            "user.fsagent.error"} <= names
    out = run("getfattr", "-d", "-m", "user.fsagent", up / "j.bin")
    assert 'user.fsagent.state="complete"' in out.stdout
    entry = listing(fast)[0]
    assert set(entry) == {"taskID", "path", "state", "offset", "size", "progress",
                          "sha256", "job", "error", "updated"}
    assert entry["path"] == "j.bin" and entry["offset"] == 10 and entry["progress"] == 100
    assert entry["size"] is None
    with pytest.raises(PermissionError):
        open(fast.mount / "uploads.json", "w")


def test_completed_upload_starts_an_import_job_end_to_end(fast):
    """cp into uploads/ -> verified -> an import job (user.fsagent.job) that records the
    file in the manifest, readable as jobs/<id>/ files."""
    data = b"import me\n" * 1000
    (fast.uploads / "i.bin").write_bytes(data)
    wait_state(fast.uploads / "i.bin", "complete")
    job_id = wait_for(lambda: xattr(fast.uploads / "i.bin", "job"), what="an import job")
    job = fast.jobs / job_id
    assert (job / "wait").read_text().strip() == "success"
    info = json.loads((job / "info.json").read_text())
    assert info["Type"].lower() == "import" and info["State"].lower() == "success"
    import sqlite3
    with sqlite3.connect(fast.state / "fsagent.db") as db:
        row = db.execute("SELECT size, sha256 FROM manifest WHERE path = ?",
                         ("i.bin",)).fetchone()
    assert row == (len(data), hashlib.sha256(data).hexdigest())
    uploads = json.loads((fast.mount / "uploads.json").read_text())
    assert [u["job"] for u in uploads if u["path"] == "i.bin"] == [job_id]


def test_completed_upload_is_handed_to_the_job_engine(fast):
    """The hand-off creates an import job; the upload records its ID across restarts."""
    (fast.uploads / "i.bin").write_bytes(b"i")
    wait_state(fast.uploads / "i.bin", "complete")
    job = wait_for(lambda: xattr(fast.uploads / "i.bin", "job"), what="an import job")
    assert (fast.jobs / job / "wait").read_text() == "success\n"
    assert json.loads((fast.jobs / job / "info.json").read_text())["Type"] == "import"
    fast.stop()
    fast.start()
    assert state(fast.uploads / "i.bin") == "complete"
    assert xattr(fast.uploads / "i.bin", "job") == job


def test_names_that_are_not_utf8_are_refused_and_change_nothing(fast):
    """Task paths travel as text (SQLite, JSON, RPC, ZIP), so a name that is not UTF-8 is
    refused with EILSEQ by create, mkdir, symlink and rename; nothing is created, and
    the agent carries on (such a name once crashed its bookkeeping)."""
    up = os.fsencode(fast.uploads)
    bad = up + b"/\xff\xfe.bin"
    for attempt in (lambda: os.open(bad, os.O_WRONLY | os.O_CREAT, 0o644),
                    lambda: os.mkdir(bad),
                    lambda: os.symlink(b"target", bad)):
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EILSEQ
    (fast.uploads / "ok.bin").write_bytes(b"fine")
    with pytest.raises(OSError) as e:
        os.rename(up + b"/ok.bin", bad)
    assert e.value.errno == errno.EILSEQ
    result = run("cp", "/etc/hostname", os.fsdecode(bad))
    assert result.returncode != 0 and "Invalid or incomplete multibyte" in result.stderr
    assert os.listdir(up) == [b"ok.bin"]
    wait_state(fast.uploads / "ok.bin", "complete")
    assert fast.status()["pid"] == fast.proc.pid
    fast.stop()
    assert os.listdir(os.fsencode(fast.state / "data" / "uploads")) == [b"ok.bin"]


def test_a_file_put_into_the_store_by_hand_with_a_non_utf8_name_is_left_alone(fast):
    """Not an upload task (it could not be one through the mount), logged, listed, and
    readable; the other uploads carry on."""
    fast.stop()
    store = os.fsencode(fast.state / "data" / "uploads")
    with open(store + b"/\xe9t\xe9.txt", "wb") as f:
        f.write(b"latin-1 name")
    fast.start()
    assert b"\xe9t\xe9.txt" in os.listdir(os.fsencode(fast.uploads))
    with open(os.fsencode(fast.uploads) + b"/\xe9t\xe9.txt", "rb") as f:
        assert f.read() == b"latin-1 name"
    assert listing(fast) == []
    (fast.uploads / "next.bin").write_bytes(b"next")
    wait_state(fast.uploads / "next.bin", "complete")
    assert "its name is not UTF-8" in fast.log()
    assert fast.stop() == 0


def test_an_import_that_cannot_start_is_visible_and_retried_until_it_can(fast):
    """The job engine's database refuses writes (the WAL made immutable: a real
    write failure, as a failing disk gives). The verified upload says why its import
    has not started, keeps its data and state, and is handed off once writes work."""
    wal = fast.state / "fsagent.db-wal"
    (fast.uploads / "warm.bin").write_bytes(b"warm")  # the WAL exists once something is written
    wait_for(lambda: xattr(fast.uploads / "warm.bin", "job"), what="a first import")
    subprocess.run(["chattr", "+i", wal], check=True)
    try:
        data = b"held back\n" * 100
        (fast.uploads / "held.bin").write_bytes(data)
        wait_state(fast.uploads / "held.bin", "complete")
        error = wait_for(lambda: xattr(fast.uploads / "held.bin", "error"),
                         what="the hand-off error")
        assert error.startswith("held.bin: import not started (") and "next try in" in error
        assert xattr(fast.uploads / "held.bin", "job") == ""

        def listed_error():
            # Each failed retry rewrites the error ("next try in N s"): judge only a
            # listing read while the error held still.
            before = xattr(fast.uploads / "held.bin", "error")
            listed = [u["error"] for u in listing(fast) if u["path"] == "held.bin"]
            return before == xattr(fast.uploads / "held.bin", "error") and (before, listed)

        error, listed = wait_for(listed_error, what="the error to hold still for one read")
        assert listed == [error]
    finally:
        subprocess.run(["chattr", "-i", wal], check=True)
    job = wait_for(lambda: xattr(fast.uploads / "held.bin", "job"), what="the retried import")
    assert (fast.jobs / job / "wait").read_text() == "success\n"
    assert xattr(fast.uploads / "held.bin", "error") == ""
    assert (fast.uploads / "held.bin").read_bytes() == data
    assert "handed to the job engine after earlier failures" in fast.log()
    assert fast.stop() == 0
