"""uploads/ accepts what a local disk accepts: special files and paths of any length.

* FIFOs, sockets and (for root) device nodes are created as on ext4, with their type
  and device number, and are never upload tasks; `rsync -a`, `cp -a` and `tar -x` of a
  tree holding them exit 0. A device node by anyone else: EPERM, as on a local disk.
* The agent's backing path is longer than the client's, so a path the client reaches
  step by step (chdir, relative names, directory descriptors) may be far past
  PATH_MAX there: it must work all the same, and a missing one is ENOENT.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from conftest import wait_for

FAST = """
settle_seconds = 0.6
checkpoint_seconds = 0.5
store_reserve_bytes = 0
"""


@pytest.fixture
def fast(agent_factory):
    return agent_factory(config=FAST).start()


def xattr(path, key: str) -> str:
    return os.getxattr(path, f"user.fsagent.{key}").decode()


def wait_complete(path, timeout: float = 20.0) -> None:
    wait_for(lambda: xattr(path, "state") == "complete", timeout, f"{path} to be complete")


def run(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(map(str, argv)), capture_output=True, text=True, **kw)


def listed_paths(agent) -> set[str]:
    return {t["path"] for t in json.loads((agent.mount / "uploads.json").read_text())}


def fsagent_xattrs(path) -> list[str]:
    return [n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user.fsagent.")]


def job_succeeds(agent, job: str) -> None:
    assert (agent.jobs / job / "wait").read_text().strip() == "success", \
        (agent.jobs / job / "log").read_text()


def submit_job(agent, name: str, spec: dict):
    job = agent.jobs / name
    os.mkdir(job)
    (job / "spec").write_text(json.dumps(spec) + "\n")
    assert (job / "wait").read_text() == "success\n", (job / "message").read_text()
    return job


def make_socket(path) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
    finally:
        s.close()


# -- special files ----------------------------------------------------------------------------


def test_fifo_socket_and_device_node_are_real_and_are_not_tasks(fast):
    up = fast.uploads
    (up / "d").mkdir()
    os.mkfifo(up / "d/fifo", 0o640)
    make_socket(up / "d/sock")
    os.mknod(up / "d/null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(up / "d/blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    (up / "d/data.bin").write_bytes(b"payload")
    for name, kind in (("fifo", stat.S_ISFIFO), ("sock", stat.S_ISSOCK),
                       ("null", stat.S_ISCHR), ("blk", stat.S_ISBLK)):
        st = os.lstat(up / "d" / name)
        assert kind(st.st_mode), name
        backing = os.lstat(fast.state / "data/uploads/d" / name)
        assert (st.st_mode, st.st_rdev) == (backing.st_mode, backing.st_rdev), name
    assert stat.S_IMODE(os.lstat(up / "d/fifo").st_mode) == 0o640
    assert os.lstat(up / "d/null").st_rdev == os.makedev(1, 3)
    assert os.lstat(up / "d/blk").st_rdev == os.makedev(7, 200)
    assert sorted(os.listdir(up / "d")) == ["blk", "data.bin", "fifo", "null", "sock"]

    # A FIFO in the mount is a pipe: the kernel serves it, the agent never sees the bytes.
    received = []
    reader = threading.Thread(target=lambda: received.append((up / "d/fifo").read_bytes()),
                              daemon=True)
    reader.start()
    with open(up / "d/fifo", "wb") as w:
        w.write(b"through the pipe")
    reader.join(10)
    assert received == [b"through the pipe"]
    # A socket file in the mount is bound to and connected through like any other.
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(up / "d/live.sock"))
    server.listen(1)
    with server, socket.socket(socket.AF_UNIX) as client:
        client.connect(str(up / "d/live.sock"))
        conn, _ = server.accept()
        with conn:
            client.sendall(b"ping")
            assert conn.recv(4) == b"ping"

    wait_complete(up / "d/data.bin")
    for name in ("fifo", "sock", "null", "blk", "live.sock"):
        assert fsagent_xattrs(up / "d" / name) == [], name
        with pytest.raises(OSError) as e:
            os.getxattr(up / "d" / name, "user.fsagent.state", follow_symlinks=False)
        assert e.value.errno == errno.ENODATA, name
    assert listed_paths(fast) == {"d/data.bin"}
    # Renamed and removed as on a local disk, still no task; one renamed over a task ends it.
    os.rename(up / "d/fifo", up / "d/fifo2")
    os.rename(up / "d/sock", up / "d/data.bin")
    assert stat.S_ISSOCK(os.lstat(up / "d/data.bin").st_mode)
    assert listed_paths(fast) == set()
    os.unlink(up / "d/null")
    # Crash recovery's walk ignores them too.
    fast.kill9()
    fast.start()
    assert sorted(os.listdir(up / "d")) == ["blk", "data.bin", "fifo2", "live.sock"]
    assert stat.S_ISFIFO(os.lstat(up / "d/fifo2").st_mode)
    assert listed_paths(fast) == set()
    assert "Traceback" not in fast.log()


def test_mknod_of_a_regular_file_is_an_upload(fast):
    """mknod(2) with S_IFREG reaches the agent as mknod, not create: an empty upload."""
    os.mknod(fast.uploads / "empty", stat.S_IFREG | 0o644)
    assert stat.S_ISREG(os.lstat(fast.uploads / "empty").st_mode)
    wait_complete(fast.uploads / "empty")
    assert xattr(fast.uploads / "empty", "sha256") == hashlib.sha256(b"").hexdigest()


@pytest.fixture
def special_tree(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(50_000))
    (src / "sub/b.bin").write_bytes(os.urandom(120_000))
    os.mkfifo(src / "fifo")
    os.mkfifo(src / "sub/fifo2")
    make_socket(src / "sub/sock")
    return src


def test_rsync_cp_and_tar_of_a_tree_with_a_fifo_and_a_socket(fast, special_tree, tmp_path):
    """Each tool does what it does on ext4 and exits 0: rsync -a and cp -a recreate the
    FIFOs and the socket; GNU tar archives no sockets (a warning at -c), so tar -x
    recreates the FIFOs. The regular files become complete uploads; the rest never."""
    up, src = fast.uploads, special_tree
    tar = tmp_path / "tree.tar"
    created = run("tar", "-C", src, "-cf", tar, ".")
    assert created.returncode == 0 and "socket ignored" in created.stderr
    expected = {}
    for tool, argv, carries_socket in (
            ("rsync", ["rsync", "-a", f"{src}/", up / "rsync"], True),
            ("cp", ["cp", "-a", src, up / "cp"], True),
            ("tar", ["tar", "-C", up / "tar", "-xf", tar], False)):
        if tool == "tar":
            (up / "tar").mkdir()
        result = run(*argv)
        assert result.returncode == 0, (tool, result.stderr)
        dst = up / tool
        assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode), tool
        assert stat.S_ISFIFO(os.lstat(dst / "sub/fifo2").st_mode), tool
        assert os.path.lexists(dst / "sub/sock") == carries_socket, tool
        if carries_socket:
            assert stat.S_ISSOCK(os.lstat(dst / "sub/sock").st_mode), tool
        for rel in ("a.bin", "sub/b.bin"):
            assert (dst / rel).read_bytes() == (src / rel).read_bytes()
            expected[f"{tool}/{rel}"] = hashlib.sha256((src / rel).read_bytes()).hexdigest()
    for rel, digest in expected.items():
        wait_complete(up / rel)
        assert xattr(up / rel, "sha256") == digest
    assert listed_paths(fast) == set(expected)
    # A second rsync -a sends nothing and still exits 0.
    again = run("rsync", "-ai", f"{src}/", up / "rsync")
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr


def test_only_root_makes_device_nodes(shared_dir, agent_factory, other_user):
    """Another user (allow_other) makes FIFOs and sockets, owned by them, but a device
    node is EPERM, as on a local disk; root's succeeds."""
    agent = agent_factory(mount=shared_dir / "mnt", state=shared_dir / "state",
                          config="allow_other = true\n" + FAST).start()
    up = agent.uploads
    fifo = other_user.run("mkfifo", str(up / "theirs.fifo"))
    assert fifo.returncode == 0, fifo.stderr
    sock = other_user.run(sys.executable, "-c", "import socket, sys; "
                          "socket.socket(socket.AF_UNIX).bind(sys.argv[1])", str(up / "s"))
    assert sock.returncode == 0, sock.stderr
    for name in ("theirs.fifo", "s"):
        st = os.lstat(up / name)
        assert (st.st_uid, st.st_gid) == (other_user.uid, other_user.gid), name
        assert os.lstat(agent.state / "data/uploads" / name).st_uid == other_user.uid, name
    for kind in ("c", "b"):
        device = other_user.run("mknod", str(up / f"dev-{kind}"), kind, "1", "3")
        assert device.returncode != 0 and "Operation not permitted" in device.stderr, \
            device.stderr
        assert not os.path.lexists(up / f"dev-{kind}")
    assert run("mknod", up / "dev-c", "c", "1", "3").returncode == 0
    assert os.lstat(up / "dev-c").st_rdev == os.makedev(1, 3)
    assert sorted(os.listdir(agent.state / "data/uploads")) == ["dev-c", "s", "theirs.fifo"]


# -- long paths ---------------------------------------------------------------------------------

COMPONENT = "c" * 200


def long_dirs(length: int) -> list[str]:
    """Directory names of 200 bytes whose joined path is at least ``length`` bytes."""
    parts = []
    while len("/".join(parts)) < length:
        parts.append(COMPONENT[: 200 - len(str(len(parts)))] + str(len(parts)))
    return parts


@contextlib.contextmanager
def dir_fd(base, parts: list[str], *, create: bool = False):
    """A descriptor of ``base/parts...``, reached one name at a time (any length)."""
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
            following = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = following
        yield fd
    finally:
        os.close(fd)


def via(fd: int, name: str) -> str:
    """A short path for ``name`` in the directory of ``fd`` (for calls without dir_fd)."""
    return f"/proc/self/fd/{fd}/{name}"


# A child whose cwd is deep inside the mount: it walks there with chdir, one name at a
# time, then runs the code it was given with relative names (as pjdfstest does).
DEEP_CHILD = r"""
import json, os, sys
os.chdir(sys.argv[1])
for part in json.loads(sys.argv[2]):
    if not os.path.isdir(part):
        os.mkdir(part)
    os.chdir(part)
out = {}
exec(sys.argv[3])
print(json.dumps(out))
"""


def in_deep(base, parts: list[str], code: str) -> dict:
    result = run(sys.executable, "-c", DEEP_CHILD, base, json.dumps(parts), code, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_rsync_of_a_4060_byte_relative_path(fast, tmp_path):
    """The relative path is 4,060 bytes: fine on ext4, and past PATH_MAX once the agent
    puts its state directory in front. rsync exits 0; the file completes with the right
    hash, and its import records it in the manifest."""
    src = tmp_path / "src"
    src.mkdir()
    parts = long_dirs(4000)
    name = "f" * (4060 - len("/".join(parts)) - 1)
    rel = "/".join(parts + [name])
    assert len(rel) == 4060
    data = os.urandom(300_000)
    with dir_fd(src, parts, create=True) as fd:
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
        os.symlink(name, "link", dir_fd=fd)  # for the archive: followed inside uploads/
    assert len(os.fsencode(fast.state / "data/uploads/t" / rel)) > 4096
    result = run("rsync", "-a", f"{src}/", fast.uploads / "t")
    assert result.returncode == 0, result.stderr
    with dir_fd(fast.uploads / "t", parts) as fd:
        wait_complete(via(fd, name))
        assert xattr(via(fd, name), "sha256") == hashlib.sha256(data).hexdigest()
        with open(via(fd, name), "rb") as f:
            assert f.read() == data
        job = wait_for(lambda: xattr(via(fd, name), "job"), what="the import job")
    job_succeeds(fast, job)
    with sqlite3.connect(fast.state / "fsagent.db") as db:
        row = db.execute("SELECT size, sha256 FROM manifest WHERE path = ?",
                         ("t/" + rel,)).fetchone()
    assert row == (len(data), hashlib.sha256(data).hexdigest())
    assert listed_paths(fast) == {"t/" + rel}
    # A re-run finds everything in place.
    again = run("rsync", "-ai", f"{src}/", fast.uploads / "t")
    assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr

    # The jobs that read uploads/ reach it too: an archive (the symlink followed) and a
    # verify against the manifest the import wrote.
    archive = submit_job(fast, "zip", {"type": "archive", "paths": ["t"]})
    with zipfile.ZipFile(archive / "outputs/archive.zip") as zf:
        members = {n for n in zf.namelist() if not n.endswith("/")}
        assert members == {"t/" + rel, "t/" + rel.rpartition("/")[0] + "/link"}, members
        assert all(zf.read(m) == data for m in members)
    verify = submit_job(fast, "check", {"type": "verify", "paths": ["t"]})
    report = json.loads((verify / "outputs/report.json").read_text())
    link = "t/" + rel.rpartition("/")[0] + "/link"  # a path to it, but never imported
    assert {f["path"]: f["status"] for f in report["files"]} == \
        {"t/" + rel: "ok", link: "unrecorded"}, report


def test_a_missing_long_path_is_enoent(fast):
    parts = long_dirs(4200)
    with dir_fd(fast.uploads, parts, create=True) as fd:
        for attempt in (lambda: os.rmdir("missing", dir_fd=fd),
                        lambda: os.unlink("missing", dir_fd=fd),
                        lambda: os.stat("missing", dir_fd=fd),
                        lambda: os.open("missing", os.O_RDONLY, dir_fd=fd),
                        lambda: os.rename("missing", "other", src_dir_fd=fd, dst_dir_fd=fd)):
            with pytest.raises(FileNotFoundError):
                attempt()
        os.mkdir("here", dir_fd=fd)
        os.rmdir("here", dir_fd=fd)
        assert os.listdir(fd) == []
    # The whole chain is there, and goes away as on a local disk.
    assert run("rm", "-r", fast.uploads / parts[0]).returncode == 0
    assert os.listdir(fast.uploads) == []


DEEP_OPERATIONS = r"""
import errno, hashlib, stat, time
data = b"deep data " * 5000
with open("f.bin", "wb") as f:
    f.write(data)
out["cwd_bytes"] = len(os.getcwd())
out["size"] = os.stat("f.bin").st_size
os.setxattr("f.bin", "user.note", b"deep")
out["note"] = os.getxattr("f.bin", "user.note").decode()
out["listed"] = sorted(os.listxattr("f.bin"))
os.chmod("f.bin", 0o600)
os.utime("f.bin", ns=(1_000_000_000, 1_500_000_000_123_456_789))
st = os.stat("f.bin")
out["mode"], out["mtime"] = stat.S_IMODE(st.st_mode), st.st_mtime_ns
os.mkdir("sub")
os.rename("f.bin", "sub/g.bin")
os.symlink("sub/g.bin", "link")
out["readlink"] = os.readlink("link")
out["through_link"] = hashlib.sha256(open("link", "rb").read()).hexdigest()
os.mkfifo("fifo")
out["fifo"] = stat.S_ISFIFO(os.lstat("fifo").st_mode)
with open("gone.bin", "wb") as f:
    f.write(b"short-lived")
os.truncate("gone.bin", 5)
out["truncated"] = open("gone.bin", "rb").read().decode()
os.unlink("gone.bin")
# mv -n: renameat2(RENAME_NOREPLACE), refused over an existing name, done otherwise.
with open("x.bin", "wb") as f:
    f.write(b"x")
import subprocess
subprocess.run(["mv", "-n", "x.bin", "sub/g.bin"], check=True)
subprocess.run(["mv", "-n", "x.bin", "y.bin"], check=True)
out["noreplace"] = [os.path.exists("x.bin"), open("y.bin", "rb").read().decode()]
os.unlink("y.bin")
try:
    os.link("sub/g.bin", "hard")
except OSError as e:
    out["link_errno"] = e.errno
deadline = time.monotonic() + 20
while os.getxattr("sub/g.bin", "user.fsagent.state") != b"complete":
    assert time.monotonic() < deadline, "not complete"
    time.sleep(0.05)
out["sha256"] = os.getxattr("sub/g.bin", "user.fsagent.sha256").decode()
out["expected"] = hashlib.sha256(data).hexdigest()
out["task"] = os.getxattr("sub/g.bin", "user.fsagent.task").decode()
out["names"] = sorted(os.listdir("."))
"""


def test_create_rename_unlink_stat_xattr_past_path_max(fast):
    """A client whose cwd is deep in the mount: every ordinary operation works on names
    whose backing paths are > 4096 bytes (here > 8 KiB); a directory rename above the
    file keeps its task, and so does a kill -9 and restart (recovery's walk)."""
    parts = ["top"] + long_dirs(8300)
    out = in_deep(fast.uploads, parts, DEEP_OPERATIONS)
    assert out["cwd_bytes"] > 8300
    assert out["size"] == 50_000 and out["note"] == "deep"
    assert "user.note" in out["listed"] and "user.fsagent.state" in out["listed"]
    assert (out["mode"], out["mtime"]) == (0o600, 1_500_000_000_123_456_789)
    assert out["readlink"] == "sub/g.bin" and out["through_link"] == out["expected"]
    assert out["truncated"] == "short" and out["noreplace"] == [False, "x"]
    assert out["fifo"] is True and out["link_errno"] == errno.EPERM  # hard links: by design
    assert out["sha256"] == out["expected"]
    assert out["names"] == ["fifo", "link", "sub"]
    rel = "/".join(parts + ["sub", "g.bin"])
    assert listed_paths(fast) == {rel}
    with dir_fd(fast.uploads, parts + ["sub"]) as fd:
        job = wait_for(lambda: xattr(via(fd, "g.bin"), "job"), what="the import job")
    job_succeeds(fast, job)
    # Crash recovery's walk finds it at its length (a walk that could not reach it would
    # forget the task and adopt the file again as a new one).
    fast.kill9()
    fast.start()
    with dir_fd(fast.uploads, parts + ["sub"]) as fd:
        assert [xattr(via(fd, "g.bin"), k) for k in ("task", "state", "job")] == \
            [out["task"], "complete", job]

    # A directory rename far above the file moves its task with it ...
    os.rename(fast.uploads / "top", fast.uploads / "moved")
    moved = ["moved"] + parts[1:] + ["sub"]
    with dir_fd(fast.uploads, moved) as fd:
        assert xattr(via(fd, "g.bin"), "task") == out["task"]
    # ... and so does a rename of a deep directory.
    with dir_fd(fast.uploads, moved[:-1]) as fd:
        os.rename("sub", "sub2", src_dir_fd=fd, dst_dir_fd=fd)
    renamed = moved[:-1] + ["sub2"]
    with dir_fd(fast.uploads, renamed) as fd:
        assert xattr(via(fd, "g.bin"), "task") == out["task"]
    assert listed_paths(fast) == {"/".join(renamed + ["g.bin"])}
    assert fast.stop() == 0
    fast.start()
    with dir_fd(fast.uploads, renamed) as fd:
        assert [xattr(via(fd, "g.bin"), k) for k in ("task", "state", "job")] == \
            [out["task"], "complete", job]
        assert os.getxattr(via(fd, "g.bin"), "user.note") == b"deep"
    assert listed_paths(fast) == {"/".join(renamed + ["g.bin"])}
    assert "Traceback" not in fast.log()
