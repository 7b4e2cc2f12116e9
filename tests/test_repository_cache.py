"""The local disk as a cache of the S3 repository (fsagent/repository/_cache.py).

Against ``rclone serve s3`` on 127.0.0.1 (tests/s3util.py), with real agents writing and
reading through their mount and real tools (sha256sum, cp, rsync) reading evicted files.
What the store holds is read with botocore; what the local disk holds, with ``os.stat``
of the backing file (``st_blocks``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import PATIENCE, run_fsagent, wait_for
from test_upload_rpc import call
from s3util import CountingProxy, RcloneS3
from test_repository_s3 import (
    get, job_of, keys, metric, new_bucket, repo_config, wait_job, write_upload,
)

MiB = 2**20
# What a punched file may still hold on the disk: its unaligned last block, an extent
# block (ext4 keeps a few).
FREED_SLACK = 64 * 1024


@pytest.fixture(scope="module")
def rclone(tmp_path_factory):
    server = RcloneS3(tmp_path_factory.mktemp("rclone")).start()
    yield server
    server.stop()


def backing(agent, rel: str):
    return agent.state / "data" / "uploads" / rel


def cache_status(agent) -> dict:
    return agent.status()["repository"]["cache"]


def wait_evicted(agent, n: int) -> dict:
    return wait_for(lambda: (c := cache_status(agent))["evicted_files"] >= n and c,
                    what=f"{n} evicted files")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def xattr(path, name: str) -> str:
    return os.getxattr(path, name).decode()


def test_verified_copies_are_evicted_and_read_back_byte_identical(agent_factory, tmp_path,
                                                                  rclone, cli):
    bucket = new_bucket(rclone)
    agent = agent_factory(config=repo_config(tmp_path, rclone.endpoint, bucket)
                          + "cache_bytes = 1\n").start()
    big = os.urandom(13 * MiB + 4321)   # three parts
    small = b"small and evicted\n" * 100
    write_upload(agent, "exp/big.bin", big)
    write_upload(agent, "exp/small.txt", small)
    os.setxattr(agent.uploads / "exp/big.bin", "user.note", b"kept")
    before = {r: os.stat(agent.uploads / r) for r in ("exp/big.bin", "exp/small.txt")}
    done = wait_job(agent, job_of(agent, "exp/big.bin"))
    assert done["State"] == "Success", done
    cache = wait_evicted(agent, 2)
    assert cache["evicted_bytes"] == len(big) + len(small)

    for rel, data in (("exp/big.bin", big), ("exp/small.txt", small)):
        local = os.stat(backing(agent, rel))
        assert local.st_size == len(data), local
        assert local.st_blocks * 512 <= FREED_SLACK, local   # its blocks are freed
        seen = os.stat(agent.uploads / rel)
        assert (seen.st_size, seen.st_mtime_ns, seen.st_mode, seen.st_uid) == (
            before[rel].st_size, before[rel].st_mtime_ns, before[rel].st_mode,
            before[rel].st_uid)
        assert xattr(agent.uploads / rel, "user.fsagent.state") == "complete"
        assert xattr(agent.uploads / rel, "user.fsagent.sha256") == sha(data)
    assert xattr(agent.uploads / "exp/big.bin", "user.note") == "kept"

    # Real tools read the evicted files through the mount, byte for byte.
    out = subprocess.run(["sha256sum", str(agent.uploads / "exp/big.bin"),
                          str(agent.uploads / "exp/small.txt")], capture_output=True,
                         text=True, check=True).stdout
    assert out.split()[0::2] == [sha(big), sha(small)]
    copy = tmp_path / "out.bin"
    subprocess.run(["cp", str(agent.uploads / "exp/big.bin"), str(copy)], check=True)
    assert copy.read_bytes() == big
    half = tmp_path / "half.bin"
    half.write_bytes(big[:5 * MiB])
    subprocess.run(["rsync", "--append-verify", str(agent.uploads / "exp/big.bin"),
                    str(half)], check=True)
    assert half.read_bytes() == big
    # Reading did not bring the copies back; it came from the store.
    assert os.stat(backing(agent, "exp/big.bin")).st_blocks * 512 <= FREED_SLACK
    assert metric(agent, "fsagent_repository_read_back_bytes_total") >= 2 * len(big)
    assert metric(agent, "fsagent_repository_evictions_total") == 2
    assert metric(agent, "fsagent_repository_evicted_files") == 2
    text = cli("status", "--socket", str(agent.socket))
    assert "cache: 2 files evicted" in text.stdout, text.stdout

    # The agent stopped and started again: still evicted, still complete, same bytes.
    agent.stop()
    agent.start()
    assert xattr(agent.uploads / "exp/big.bin", "user.fsagent.state") == "complete"
    assert (agent.uploads / "exp/big.bin").read_bytes() == big
    assert cache_status(agent)["evicted_files"] == 2


def test_writing_an_evicted_file_fetches_it_back_first(agent_factory, tmp_path, rclone):
    bucket = new_bucket(rclone)
    agent = agent_factory(config=repo_config(tmp_path, rclone.endpoint, bucket,
                                             grouping="file") + "cache_bytes = 1\n").start()
    data = os.urandom(6 * MiB)
    other = os.urandom(3 * MiB)
    write_upload(agent, "w/data.bin", data)
    write_upload(agent, "w/other.bin", other)
    for rel in ("w/data.bin", "w/other.bin"):
        assert wait_job(agent, job_of(agent, rel))["State"] == "Success"
    wait_evicted(agent, 2)

    # A write in the middle: the rest of the file must be the old bytes.
    with open(agent.uploads / "w/data.bin", "r+b") as f:
        f.seek(MiB)
        f.write(b"CHANGED")
    changed = data[:MiB] + b"CHANGED" + data[MiB + 7:]
    assert (agent.uploads / "w/data.bin").read_bytes() == changed
    assert os.stat(backing(agent, "w/data.bin")).st_blocks * 512 >= len(data)  # local again
    # A truncate by path of the other, then its tail written again (an append).
    os.truncate(agent.uploads / "w/other.bin", 1000)
    assert (agent.uploads / "w/other.bin").read_bytes() == other[:1000]
    assert xattr(agent.uploads / "w/other.bin", "user.fsagent.state") != "complete"
    with open(agent.uploads / "w/other.bin", "ab") as f:
        f.write(other[1000:])
    # Both settle into complete uploads of their bytes, as any rewrite does.
    for rel, now in (("w/data.bin", changed), ("w/other.bin", other)):
        wait_for(lambda: xattr(agent.uploads / rel, "user.fsagent.state") == "complete"
                 and xattr(agent.uploads / rel, "user.fsagent.sha256") == sha(now),
                 what=f"{rel} complete with its new hash")
    assert metric(agent, "fsagent_repository_fetched_back_total") == 2


def test_emptying_an_evicted_file_fetches_nothing(agent_factory, tmp_path, rclone, cli):
    """``cp`` over an evicted file (an open with O_TRUNC) and a truncate to 0 throw its
    bytes away: nothing is fetched back from the store for them, the new bytes become
    a new version, and a restart finds the files as they are now."""
    bucket = new_bucket(rclone)
    agent = agent_factory(config=repo_config(tmp_path, rclone.endpoint, bucket,
                                             grouping="file") + "cache_bytes = 1\n").start()
    for rel in ("e/cp.bin", "e/trunc.bin"):
        write_upload(agent, rel, os.urandom(8 * MiB))
        assert wait_job(agent, job_of(agent, rel))["State"] == "Success"
    wait_evicted(agent, 2)
    read_back = metric(agent, "fsagent_repository_read_back_bytes_total")

    # Each keeps its declared size (8 MiB), so each new version is 8 MiB too.
    new, again = os.urandom(8 * MiB), os.urandom(8 * MiB)
    source = tmp_path / "new.bin"
    source.write_bytes(new)
    subprocess.run(["cp", str(source), str(agent.uploads / "e/cp.bin")], check=True)
    os.truncate(agent.uploads / "e/trunc.bin", 0)
    assert (agent.uploads / "e/trunc.bin").read_bytes() == b""
    with open(agent.uploads / "e/trunc.bin", "ab") as f:
        f.write(again)
    # Nothing came from the store for them (read before anything reads the new bytes,
    # which may be pushed and evicted in turn).
    assert metric(agent, "fsagent_repository_fetched_back_total") == 0
    assert metric(agent, "fsagent_repository_read_back_bytes_total") == read_back
    for when in ("now", "after a kill -9 and a restart"):
        if when != "now":
            agent.kill9()
            agent.start()
        for rel, now in (("e/cp.bin", new), ("e/trunc.bin", again)):
            assert (agent.uploads / rel).read_bytes() == now, when
            wait_for(lambda: xattr(agent.uploads / rel, "user.fsagent.state") == "complete"
                     and xattr(agent.uploads / rel, "user.fsagent.sha256") == sha(now),
                     what=f"{rel} complete with its new hash {when}")


def test_a_file_removed_while_it_is_pushed_leaves_nothing_in_the_store(agent_factory,
                                                                        tmp_path, rclone):
    """``rm`` of a file whose multipart push is in flight (the proxy holds the answers to
    its later parts): when the push ends, however it ends, neither an object nor an
    unfinished multipart upload of it stays in the store (a store keeps, and bills, the
    parts of an upload nobody completes), and nothing is left to delete."""
    bucket = new_bucket(rclone)
    proxy = CountingProxy(rclone.port)
    agent = None
    try:
        agent = agent_factory(config=repo_config(tmp_path, proxy.endpoint, bucket,
                                                 concurrency=2, grouping="file")).start()
        proxy.hold_after(3)
        write_upload(agent, "mid/big.bin", os.urandom(40 * MiB))   # eight parts
        job_id = job_of(agent, "mid/big.bin")
        assert proxy.held.wait(PATIENCE), "no part was held"
        os.unlink(agent.uploads / "mid/big.bin")
        proxy.release()
        wait_job(agent, job_id)
        wait_for(lambda: not [k for k in keys(rclone, bucket) if "big.bin" in k]
                 and cache_status(agent)["deletes_pending"] == 0,
                 what="no object of the removed file, nothing left to delete")
        assert rclone.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        proxy.close()
        if agent is not None:
            agent.cleanup()


@pytest.mark.parametrize("keep", [False, True])
def test_unlink_deletes_the_object_or_keeps_it_under_deleted(agent_factory, tmp_path, rclone,
                                                             keep):
    bucket = new_bucket(rclone)
    agent = agent_factory(config=repo_config(tmp_path, rclone.endpoint, bucket,
                                             grouping="file")
                          + f"keep_deleted = {'true' if keep else 'false'}\n").start()
    data = b"to be removed\n" * 1000
    write_upload(agent, "rm/gone.txt", data)
    write_upload(agent, "rm/stays.txt", b"stays\n")
    for rel in ("rm/gone.txt", "rm/stays.txt"):
        assert wait_job(agent, job_of(agent, rel))["State"] == "Success"
    assert "lab1/rm/gone.txt" in keys(rclone, bucket)
    os.unlink(agent.uploads / "rm/gone.txt")
    wait_for(lambda: "lab1/rm/gone.txt" not in keys(rclone, bucket),
             what="the removed file's object to go")
    present = keys(rclone, bucket)
    assert "lab1/rm/stays.txt" in present
    if keep:
        assert "lab1/deleted/rm/gone.txt" in present
        assert get(rclone, bucket, "lab1/deleted/rm/gone.txt") == data
    else:
        assert not [k for k in present if "deleted/" in k]
    assert metric(agent, "fsagent_repository_objects_deleted_total") == 1


@contextlib.contextmanager
def agent_on_a_small_store(agent_factory, tmp_path, rclone, extra: str = ""):
    """An agent (not started) whose state directory is a 48 MiB tmpfs, so its store
    runs short; ``grouping = "file"``, no reserve, plus ``extra`` settings."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(state)],
                   check=True)
    agent = None
    try:
        agent = agent_factory(config="store_reserve_bytes = 0\n" + repo_config(
            tmp_path, rclone.endpoint, new_bucket(rclone), grouping="file") + extra,
            state=state)
        yield agent
    finally:
        if agent is not None:
            agent.cleanup()
        subprocess.run(["umount", "-l", str(state)], check=False)


def pushed_and_kept(agent, rel: str, size: int) -> bytes:
    """Upload ``size`` random bytes at ``rel``; once pushed, its copy is still local."""
    data = os.urandom(size)
    write_upload(agent, rel, data)
    assert wait_job(agent, job_of(agent, rel))["State"] == "Success"
    assert cache_status(agent)["evicted_files"] == 0   # no limit set: kept
    return data


def test_a_full_store_evicts_verified_copies_instead_of_refusing_writes(agent_factory,
                                                                         tmp_path, rclone):
    """The state directory is a 48 MiB tmpfs: a 20 MiB upload, pushed, then a 30 MiB
    one. Without eviction the second write fails with ENOSPC."""
    with agent_on_a_small_store(agent_factory, tmp_path, rclone) as agent:
        agent.start()
        first = pushed_and_kept(agent, "full/first.bin", 20 * MiB)
        second = os.urandom(30 * MiB)
        with open(agent.uploads / "full/second.bin", "wb") as f:   # no ENOSPC
            for i in range(0, len(second), MiB):
                f.write(second[i:i + MiB])
        assert (agent.uploads / "full/second.bin").read_bytes() == second
        assert cache_status(agent)["evicted_files"] == 1
        assert os.stat(backing(agent, "full/first.bin")).st_blocks * 512 <= FREED_SLACK
        assert hashlib.sha256((agent.uploads / "full/first.bin").read_bytes()).hexdigest() \
            == sha(first)


@pytest.mark.parametrize("how", ["setfattr", "UploadTasks.create", "ImportProcess.create"])
def test_a_size_declared_on_a_full_store_evicts_instead_of_failing(agent_factory, tmp_path,
                                                                   rclone, how):
    """A 48 MiB tmpfs store holding a pushed 20 MiB upload: declaring 30 MiB more (on
    the mount, or over RPC) evicts the pushed copy instead of answering ENOSPC /
    ``NoSpace``; the upload then arrives whole, and the evicted one still reads back."""
    with agent_on_a_small_store(agent_factory, tmp_path, rclone) as agent:
        agent.start()
        first = pushed_and_kept(agent, "full/first.bin", 20 * MiB)
        second = os.urandom(30 * MiB)
        path = agent.uploads / "full/second.bin"
        if how == "setfattr":
            path.touch()
            os.setxattr(path, "user.fsagent.size", str(len(second)).encode())  # no ENOSPC
        elif how == "UploadTasks.create":
            call(agent, "UploadTasks.create", {"path": "full/second.bin",
                                               "fileSize": len(second)})
        else:
            call(agent, "ImportProcess.create", {"root": "full", "files": [
                {"path": "second.bin", "size": len(second)}]})
        assert cache_status(agent)["evicted_files"] == 1
        assert xattr(path, "user.fsagent.size") == str(len(second))
        with open(path, "r+b") as f:
            for i in range(0, len(second), MiB):
                f.write(second[i:i + MiB])
        wait_for(lambda: xattr(path, "user.fsagent.state") == "complete",
                 what="second.bin complete")
        assert xattr(path, "user.fsagent.sha256") == sha(second)
        assert sha((agent.uploads / "full/first.bin").read_bytes()) == sha(first)


def test_killed_while_evicting_reads_stay_byte_identical(agent_factory, tmp_path, rclone):
    """SIGKILL as soon as the first copy is evicted (others are being evicted), then a
    restart: every file reads back byte for byte and stays complete with its hash."""
    bucket = new_bucket(rclone)
    config = repo_config(tmp_path, rclone.endpoint, bucket)
    agent = agent_factory(config=config).start()
    files = {f"k/f{i:02d}.bin": os.urandom(MiB + i * 4097) for i in range(12)}
    for rel, data in files.items():
        write_upload(agent, rel, data)
    assert wait_job(agent, job_of(agent, "k/f00.bin"))["State"] == "Success"
    # Now evict: a restart with a tiny cache, killed after the first eviction.
    agent.stop()
    agent.config_path.write_text(config + "cache_bytes = 1\n")
    agent.start()
    wait_for(lambda: "cache: evicted" in agent.log(), what="the first eviction")
    agent.kill9()
    agent.start()
    for rel, data in files.items():
        assert (agent.uploads / rel).read_bytes() == data, rel
        assert xattr(agent.uploads / rel, "user.fsagent.state") == "complete"
        assert xattr(agent.uploads / rel, "user.fsagent.sha256") == sha(data)
    wait_evicted(agent, len(files))


def test_a_copy_left_half_punched_or_half_fetched_is_served_from_the_store(
        agent_factory, tmp_path, rclone):
    """The states a kill -9 leaves between the durable ``evicting`` record and the
    recorded fingerprint (the punch moved the ctime, the record of it was lost), or in
    the middle of a fetch-back (some bytes written back): made in the database and the
    backing file of a stopped agent, then the agent starts. Each file must read back
    byte-identical and stay complete; its local bytes are never taken for the upload's."""
    bucket = new_bucket(rclone)
    agent = agent_factory(config=repo_config(tmp_path, rclone.endpoint, bucket)
                          + "cache_bytes = 1\n").start()
    a, b = os.urandom(3 * MiB), os.urandom(2 * MiB)
    write_upload(agent, "c/a.bin", a)
    write_upload(agent, "c/b.bin", b)
    mtimes = {r: os.stat(agent.uploads / r).st_mtime_ns for r in ("c/a.bin", "c/b.bin")}
    assert wait_job(agent, job_of(agent, "c/a.bin"))["State"] == "Success"
    wait_evicted(agent, 2)
    agent.stop()
    db = sqlite3.connect(agent.state / "fsagent.db")
    with db:
        db.execute("UPDATE repo_cache SET state = 'evicting' WHERE key = 'lab1/c/a.bin'")
    db.close()
    # a.bin: half of it still there (a punch cut short); b.bin: half fetched back. Both
    # writes move the ctime (and the mtime), as the crash would have left them.
    with open(backing(agent, "c/a.bin"), "r+b") as f:
        f.seek(MiB)
        f.write(a[MiB:2 * MiB])
    with open(backing(agent, "c/b.bin"), "r+b") as f:
        f.write(b[:MiB])
    time.sleep(0.01)
    agent.start()
    for rel, data in (("c/a.bin", a), ("c/b.bin", b)):
        assert (agent.uploads / rel).read_bytes() == data, rel
        assert xattr(agent.uploads / rel, "user.fsagent.state") == "complete"
        assert xattr(agent.uploads / rel, "user.fsagent.sha256") == sha(data)
        assert os.stat(backing(agent, rel)).st_blocks * 512 <= FREED_SLACK   # a clean hole again
        assert os.stat(agent.uploads / rel).st_mtime_ns == mtimes[rel]  # times put back
    assert cache_status(agent)["evicted_files"] == 2
    assert "was being evicted when the agent stopped" in agent.log()


@pytest.mark.parametrize("table, message", [
    ("cache_bytes = -1", "repository.cache_bytes: must be at least 0, got -1"),
    ('cache_bytes = "lots"', "repository.cache_bytes: expected an integer, got 'lots'"),
    ("cache_free_floor_bytes = true",
     "repository.cache_free_floor_bytes: expected an integer, got True"),
    ('keep_deleted = "maybe"', "repository.keep_deleted: expected true or false"),
])
def test_bad_cache_settings_are_one_line_and_exit_2(tmp_path, table, message):
    config = tmp_path / "fsagent.toml"
    config.write_text(f"[repository]\n{table}\n")
    r = subprocess.run([sys.executable, "-m", "fsagent", "config", "--config", str(config)],
                       capture_output=True, text=True)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_cache_settings_resolve_and_round_trip(tmp_path):
    config = tmp_path / "fsagent.toml"
    config.write_text("[repository]\ncache_bytes = 1073741824\ncache_free_floor_bytes = 5\n"
                      "keep_deleted = true\n")
    r = run_fsagent("config", "--config", str(config))
    assert r.returncode == 0, r.stderr
    assert "repository.cache_bytes = 1073741824" in r.stdout
    assert "repository.keep_deleted = true" in r.stdout
    again = tmp_path / "resolved.toml"
    again.write_text(r.stdout)
    assert run_fsagent("config", "--config", str(again)).stdout == r.stdout
    default = run_fsagent("config")
    assert default.returncode == 0 and "repository.cache_free_floor_bytes = 0" in default.stdout


def test_unlink_while_the_store_is_down_succeeds_and_the_delete_is_retried(agent_factory,
                                                                           tmp_path):
    """The unlink never waits on the store: with the store stopped, ``rm`` succeeds, the
    delete is recorded and retried (across a restart of the agent too) until the store
    is back."""
    server = RcloneS3(tmp_path / "own-rclone").start()
    try:
        bucket = new_bucket(server)
        agent = agent_factory(config=repo_config(tmp_path, server.endpoint, bucket,
                                                 grouping="file")).start()
        write_upload(agent, "d/gone.txt", b"gone\n" * 100)
        assert wait_job(agent, job_of(agent, "d/gone.txt"))["State"] == "Success"
        server.stop()
        os.unlink(agent.uploads / "d/gone.txt")   # returns at once, store or not
        assert not (agent.uploads / "d/gone.txt").exists()
        wait_for(lambda: metric(agent, "fsagent_repository_delete_errors_total") >= 1,
                 what="a failed delete")
        assert cache_status(agent)["deletes_pending"] == 1
        agent.stop()
        agent.start()
        server.start()
        wait_for(lambda: "lab1/d/gone.txt" not in keys(server, bucket),
                 what="the delete, retried")
        wait_for(lambda: cache_status(agent)["deletes_pending"] == 0, what="nothing pending")
    finally:
        server.stop()


def test_archive_and_verify_jobs_read_evicted_files_whole(agent_factory, tmp_path, rclone):
    """Archive and verify read uploads' backing files directly: evicted ones come back
    first (an archive of holes would be zeros under the right names)."""
    import zipfile

    from jobs_util import read, submit
    bucket = new_bucket(rclone)
    agent = agent_factory(config=repo_config(tmp_path, rclone.endpoint, bucket)
                          + "cache_bytes = 1\n").start()
    a, b = os.urandom(2 * MiB + 7), b"second file\n" * 50
    write_upload(agent, "arc/a.bin", a)
    write_upload(agent, "arc/sub/b.txt", b)
    assert wait_job(agent, job_of(agent, "arc/a.bin"))["State"] == "Success"
    wait_evicted(agent, 2)
    job = submit(agent, "zip", {"type": "archive", "paths": ["arc"], "compression": "store"})
    assert read(job / "wait") == "success\n"
    with zipfile.ZipFile(job / "outputs" / "archive.zip") as zf:
        assert zf.read("arc/a.bin") == a and zf.read("arc/sub/b.txt") == b
    job = submit(agent, "check", {"type": "verify", "paths": ["arc"]})
    assert read(job / "wait") == "success\n", (job / "log").read_text()
    assert metric(agent, "fsagent_repository_fetched_back_total") == 2


def test_the_free_space_floor_evicts_verified_copies(agent_factory, tmp_path, rclone):
    """``cache_free_floor_bytes``: on a 48 MiB store with a floor of 40 MiB, a pushed
    20 MiB upload leaves less free than the floor, so the keeper evicts it."""
    with agent_on_a_small_store(agent_factory, tmp_path, rclone,
                                f"cache_free_floor_bytes = {40 * MiB}\n") as agent:
        agent.start()
        data = os.urandom(20 * MiB)
        write_upload(agent, "floor/a.bin", data)
        assert wait_job(agent, job_of(agent, "floor/a.bin"))["State"] == "Success"
        wait_evicted(agent, 1)
        st = os.statvfs(agent.state)
        assert st.f_bavail * st.f_frsize > 40 * MiB
        assert (agent.uploads / "floor/a.bin").read_bytes() == data
