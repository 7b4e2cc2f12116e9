"""``UploadTasks.*`` and ``ImportProcess.*`` (issue 13) on a live agent: the RPC face of
the upload engine, checked against the mount's face (bytes, ``user.fsagent.*``,
``uploads.json``, ``jobs/<id>/``), with good and bad arguments, another user, a
``kill -9`` in the middle of an upload, and a third-party client (pynvim's session).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import trio
from pynvim.msgpack_rpc import socket_session

from conftest import wait_for
from fsagent.rpc import RpcError, open_client
from integrity_util import import_jobs, job_state, members_of, task_attrs
from rpcutil import text

QUICK = "settle_seconds = 0.3\nstore_reserve_bytes = 0\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def call(agent, method: str, *params):
    """One call over a fresh connection (the trio client); raises RpcError."""
    async def go():
        async with open_client(agent.socket) as client:
            return await client.call(method, *params)
    return trio.run(go)


def calls(agent, *steps):
    """Several calls on one connection, in order; returns their results."""
    async def go():
        out = []
        async with open_client(agent.socket) as client:
            for method, *params in steps:
                out.append(await client.call(method, *params))
        return out
    return trio.run(go)


def refused(agent, name: str, method: str, *params) -> str:
    """The call fails with error ``name``; returns its message."""
    with pytest.raises(RpcError) as caught:
        call(agent, method, *params)
    assert caught.value.name == name, caught.value
    return caught.value.message


def uploads_json(agent) -> list[dict]:
    return json.loads((agent.mount / "uploads.json").read_text())


def send(agent, pid: str, i: int, data: bytes, chunk: int = 1 << 16, start: int = 0) -> int:
    steps = [("ImportProcess.write", pid, i, off, data[off:off + chunk])
             for off in range(start, len(data), chunk)]
    results = calls(agent, *steps) if steps else [start]
    return results[-1]


@pytest.fixture
def agent(agent_factory):
    return agent_factory(config=QUICK).start()


# -- ImportProcess end to end ----------------------------------------------------------------


def test_import_process_three_files_one_job_as_the_mount_shows_it(agent_factory):
    # directory grouping with no quiet window: the collector would take each file the
    # moment it completes, if the process did not hold them
    agent = agent_factory(config=QUICK + "fileset_quiet_seconds = 0\n").start()
    files = {"a.tif": os.urandom(300_000), "sub/b.tif": os.urandom(70_001),
             "sub/deeper/c.txt": b"hello\n"}
    names = list(files)
    # The kernel has seen "run1" missing: a create over RPC must not be hidden by that.
    assert not (agent.uploads / "run1").exists()
    pid = call(agent, "ImportProcess.create", {
        "root": "run1", "files": [{"path": n, "size": len(files[n])} for n in names]})
    assert isinstance(pid, str) and pid
    assert (agent.uploads / "run1" / "a.tif").stat().st_size == 0
    assert sorted(os.listdir(agent.uploads / "run1")) == ["a.tif", "sub"]
    for i, n in enumerate(names):
        assert call(agent, "ImportProcess.getUploadOffset", pid, i) == 0
        assert send(agent, pid, i, files[n]) == len(files[n])
        assert call(agent, "ImportProcess.getUploadOffset", pid, i) == len(files[n])
    wait_for(lambda: all(f["state"] == "complete" for f in
                         call(agent, "ImportProcess.getProcess", pid)["files"]),
             what="the three files complete")
    assert json.loads((agent.mount / "filesets.json").read_text()) == []
    assert import_jobs(agent.mount) == []
    job = call(agent, "ImportProcess.verifyUpload", pid, [sha(files[n]) for n in names])
    assert call(agent, "ImportProcess.getHandle", pid) == job
    # the same verifyUpload again: the same job, nothing new
    assert call(agent, "ImportProcess.verifyUpload", pid, [sha(files[n]) for n in names]) == job
    for n in names:
        path = agent.uploads / "run1" / n
        out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                             check=True).stdout.split()[0]
        assert out == sha(files[n])
        attrs = task_attrs(path)
        assert attrs["state"] == "complete" and attrs["sha256"] == sha(files[n])
        assert attrs["job"] == job
    wait_for(lambda: [job_state(j) for j in import_jobs(agent.mount)] == ["success"],
             what="one successful import job")
    (found,) = import_jobs(agent.mount)
    assert found["ID"] == job
    assert sorted(m["path"] for m in members_of(found)) == sorted(f"run1/{n}" for n in names)
    listing = json.loads((agent.jobs / job / "outputs" / "fileset.json").read_text())
    assert listing["root"] == "run1"
    assert sorted(f["path"] for f in listing["files"]) == sorted(f"run1/{n}" for n in names)
    process = call(agent, "ImportProcess.getProcess", pid)
    assert process["job"] == job and process["root"] == "run1" and process["owner"] == 0
    assert [f["path"] for f in process["files"]] == [f"run1/{n}" for n in names]
    assert all(f["state"] == "complete" and f["job"] == job for f in process["files"])


# -- UploadTasks, and what the kernel caches --------------------------------------------------


def test_upload_task_create_write_delete_seen_through_the_mount_at_once(agent):
    """The kernel caches entries, attributes and missing names of uploads/ for 60 s:
    a stat before each change primes those caches, and every RPC change must show at
    once (the agent invalidates what it changed behind the kernel's back)."""
    data = os.urandom(200_000)
    os.mkdir(agent.uploads / "d")
    target = agent.uploads / "d" / "f.bin"
    with pytest.raises(FileNotFoundError):
        os.stat(target)  # a negative entry, cached

    async def first_part():
        async with open_client(agent.socket) as client:  # one connection: one writer
            created = await client.call("UploadTasks.create", {
                "path": "d/f.bin", "fileSize": len(data), "sha256": sha(data)})
            task = created["newResourceID"]
            assert created == {"newResourceID": task, "postResultType": "CreateChild",
                               "succeed": True,
                               "newResourceLocation": f"{agent.mount}/uploads/d/f.bin"}
            assert os.stat(target).st_size == 0  # now its attributes are cached
            assert "f.bin" in os.listdir(agent.uploads / "d")
            attrs = task_attrs(target)
            assert attrs["task"] == task and attrs["state"] == "receiving"
            assert await client.call("UploadTasks.write", task, 0, data[:1000]) == 1000
            assert os.stat(target).st_size == 1000
            assert target.read_bytes() == data[:1000]
            record = await client.call("UploadTasks.get", task)
            assert record["offset"] == 1000 and record["size"] == len(data)
            assert record["owner"] == 0
            assert record["state"] == "receiving" and record["progress"] == 0.5
            assert await client.call("UploadTasks.write", task, 1000,
                                     data[1000:100_000]) == 100_000
            return task

    task = trio.run(first_part)
    # the rest over another connection (the first one's close closed its writer)
    assert call(agent, "UploadTasks.getUploadOffset", task) == 100_000
    assert call(agent, "UploadTasks.write", task, 100_000, data[100_000:]) == len(data)
    assert os.stat(target).st_size == len(data)
    # complete, and (directory grouping) imported once its directory is quiet
    wait_for(lambda: call(agent, "UploadTasks.get", task)["job"], what="the RPC upload's job")
    assert target.read_bytes() == data
    # FS and RPC agree: xattrs, uploads.json, the task record
    record = call(agent, "UploadTasks.get", task)
    attrs = task_attrs(target)
    assert (attrs["state"], attrs["sha256"], attrs["offset"], attrs["job"]) == (
        record["state"], record["sha256"], str(record["offset"]), record["job"])
    assert record["sha256"] == sha(data) and record["job"]
    listed = {r["taskID"]: r for r in uploads_json(agent)}
    assert listed[task] == {k: v for k, v in record.items() if k != "owner"}
    assert {r["taskID"]: r for r in call(agent, "UploadTasks.list")}[task] == record
    # the job: jobs/<id>/info.json and JobHandle.getJob are one record
    job = record["job"]
    wait_for(lambda: json.loads((agent.jobs / job / "info.json").read_text())["State"]
             in ("Success", "success"), what="the import job")
    on_disk = json.loads((agent.jobs / job / "info.json").read_text())
    over_rpc = call(agent, "JobHandle.getJob", job)
    assert over_rpc == on_disk | {"Progress": over_rpc["Progress"],
                                  "EffectiveRuntime": over_rpc["EffectiveRuntime"]}
    # delete: gone through the mount at once (the kernel held the entry)
    assert os.stat(target).st_size == len(data)
    assert call(agent, "UploadTasks.delete", task) == {"succeed": True}
    with pytest.raises(FileNotFoundError):
        os.stat(target)
    assert os.listdir(agent.uploads / "d") == []
    refused(agent, "NoSuchTask", "UploadTasks.get", task)
    assert task not in {r["taskID"] for r in uploads_json(agent)}


def test_create_again_resumes_and_a_closed_connection_closes_the_writer(agent):
    data = os.urandom(50_000)
    spec = {"path": "r/x.bin", "fileSize": len(data)}
    task = call(agent, "UploadTasks.create", spec)["newResourceID"]
    assert call(agent, "UploadTasks.write", task, 0, data[:20_000]) == 20_000
    # that connection is closed: the writer with it, as a killed cp's close
    wait_for(lambda: task_attrs(agent.uploads / "r" / "x.bin")["state"] == "partial",
             what="the writer to close with its connection")
    again = call(agent, "UploadTasks.create", spec)
    assert again["newResourceID"] == task
    assert call(agent, "UploadTasks.getUploadOffset", task) == 20_000
    assert call(agent, "UploadTasks.write", task, 20_000, data[20_000:]) == len(data)
    wait_for(lambda: call(agent, "UploadTasks.get", task)["state"] == "complete",
             what="the resumed upload to complete")
    assert (agent.uploads / "r" / "x.bin").read_bytes() == data


def test_an_idle_writer_is_closed_while_its_connection_stays(agent):
    """A client that stops sending but keeps its connection: after a few idle seconds
    the file is closed (``partial``), as if its writer had closed it."""
    async def go():
        async with open_client(agent.socket) as client:
            task = (await client.call("UploadTasks.create", {"path": "idle.bin",
                                                             "fileSize": 10}))["newResourceID"]
            assert await client.call("UploadTasks.write", task, 0, b"12345") == 5
            assert (await client.call("UploadTasks.get", task))["state"] == "receiving"
            started = trio.current_time()
            while (await client.call("UploadTasks.get", task))["state"] == "receiving":
                await trio.sleep(0.1)
            assert trio.current_time() - started > 2
            assert (await client.call("UploadTasks.get", task))["state"] == "partial"
            # and a later write opens it again
            assert await client.call("UploadTasks.write", task, 5, b"67890") == 10
            return task

    task = trio.run(go)
    wait_for(lambda: task_attrs(agent.uploads / "idle.bin")["state"] == "complete",
             what="the resumed file to complete")


def test_a_mount_written_file_is_an_upload_task_over_rpc(agent):
    (agent.uploads / "cp.bin").write_bytes(b"from the mount")
    os.setxattr(agent.uploads / "cp.bin", "user.fsagent.size", b"14")
    task = task_attrs(agent.uploads / "cp.bin")["task"]
    wait_for(lambda: call(agent, "UploadTasks.get", task)["state"] == "complete",
             what="the copied file to complete")
    assert call(agent, "UploadTasks.get", task)["sha256"] == sha(b"from the mount")


# -- refusals ---------------------------------------------------------------------------------


@pytest.fixture
def small_agent(agent_factory):
    """Messages of at most 1 MiB: maxWriteBytes is 1 MiB - 64 KiB."""
    return agent_factory(config=QUICK + "rpc_max_message_bytes = 1048576\n").start()


def test_bad_arguments_are_refused_by_name_and_change_nothing(small_agent):
    agent = small_agent
    before = sorted(os.listdir(agent.uploads))
    for method, params in [("UploadTasks.get", ["nope"]), ("UploadTasks.delete", ["nope"]),
                           ("UploadTasks.getUploadOffset", ["nope"]),
                           ("UploadTasks.write", ["nope", 0, b"x"])]:
        assert "no upload task 'nope'" in refused(agent, "NoSuchTask", method, *params)
    for method, params in [("ImportProcess.getUploadOffset", ["nope", 0]),
                           ("ImportProcess.write", ["nope", 0, 0, b"x"]),
                           ("ImportProcess.verifyUpload", ["nope", []]),
                           ("ImportProcess.getHandle", ["nope"]),
                           ("ImportProcess.getProcess", ["nope"]),
                           ("ImportProcess.addFiles", ["nope", [{"path": "x", "size": 1}]])]:
        assert "no import process 'nope'" in refused(agent, "NoSuchProcess", method, *params)
    # paths: absolute, escaping, empty components, NUL, not UTF-8, rsync temp names
    os.symlink("/etc", agent.uploads / "link")
    (agent.uploads / "plain").write_bytes(b"x")
    os.mkdir(agent.uploads / "adir")
    for path, why in [("/etc/passwd", "absolute"), ("../x", "'..'"), ("a/../../x", "'..'"),
                      ("a//b", "empty"), ("./a", "'.'"), ("", "empty"), ("a\0b", "NUL"),
                      (b"bad\xffname", "not UTF-8"), (".x.AbC123", "temporary"),
                      (5, "must be a string"), ("x" * 256, "longer than 255"),
                      ("link/passwd", "symlink"), ("link", "symlink"),
                      ("plain/x", "not a directory"), ("adir", "not a regular file")]:
        message = refused(agent, "BadArgument", "UploadTasks.create", {"path": path})
        assert why in message, (path, message)
        message = refused(agent, "BadArgument", "ImportProcess.create",
                          {"root": "", "files": [{"path": "ok", "size": 1},
                                                 {"path": path, "size": 1}]})
        assert why in message, (path, message)
    assert "symlink" in refused(agent, "BadArgument", "ImportProcess.create",
                                {"root": "link", "files": [{"path": "x", "size": 1}]})
    # hashes, sizes, shapes
    for spec, why in [({"path": "h", "sha256": "abc"}, "sha256 must be 64 hex"),
                      ({"path": "h", "md5": "0" * 31}, "md5 must be 32 hex"),
                      ({"path": "h", "sha1": "z" * 40}, "sha1 must be 40 hex"),
                      ({"path": "h", "fileSize": -1}, "fileSize must be a non-negative"),
                      ({"path": "h", "colour": 1}, "unknown key")]:
        assert why in refused(agent, "BadArgument", "UploadTasks.create", spec)
    for spec, why in [({"root": "r", "files": []}, "non-empty list"),
                      ({"root": "r", "files": [{"path": "a", "size": 1}] * 2}, "named twice"),
                      ({"root": "r", "files": [{"path": "a"}]}, "size must be"),
                      ({"root": "r", "files": [{"path": "a", "size": 1, "sha256": "x"}]},
                       "64 hex")]:
        assert why in refused(agent, "BadArgument", "ImportProcess.create", spec)
    # too little space: named in bytes, nothing made
    message = refused(agent, "NoSpace", "UploadTasks.create", {"path": "big", "fileSize": 1 << 60})
    assert f"needs {1 << 60} bytes" in message and " free" in message
    message = refused(agent, "NoSpace", "ImportProcess.create", {
        "root": "huge", "files": [{"path": "a", "size": 1}, {"path": "b", "size": 1 << 60}]})
    assert f"needs {(1 << 60) + 1} bytes" in message
    assert sorted(os.listdir(agent.uploads)) == sorted(before + ["link", "plain", "adir"])
    assert [r["path"] for r in uploads_json(agent)] == ["plain"]

    # offsets and sizes
    task = call(agent, "UploadTasks.create", {"path": "o.bin", "fileSize": 100})["newResourceID"]
    assert "current offset is 0" in refused(agent, "BadOffset", "UploadTasks.write",
                                            task, 5, b"abc")
    assert call(agent, "UploadTasks.write", task, 0, b"x" * 10) == 10
    assert "current offset is 10" in refused(agent, "BadOffset", "UploadTasks.write",
                                             task, 0, b"abc")
    assert "passes its declared size 100" in refused(agent, "TooLarge", "UploadTasks.write",
                                                     task, 10, b"y" * 91)
    assert "non-negative" in refused(agent, "BadArgument", "UploadTasks.write", task, -1, b"")
    settings = call(agent, "ImportProcess.getImportSettings")
    assert settings["maxWriteBytes"] == (1 << 20) - (64 << 10)
    unbounded = call(agent, "UploadTasks.create", {"path": "u.bin"})["newResourceID"]
    assert "at most 983040" in refused(agent, "TooLarge", "UploadTasks.write", unbounded, 0,
                                       b"z" * (settings["maxWriteBytes"] + 1))
    assert call(agent, "UploadTasks.get", task)["offset"] == 10
    assert os.stat(agent.uploads / "o.bin").st_size == 10

    # an import process: indexes, hashes, incomplete and wrong files
    a, b = os.urandom(3000), os.urandom(2000)
    pid = call(agent, "ImportProcess.create", {"root": "p", "files": [
        {"path": "a", "size": len(a)}, {"path": "b", "size": len(b)}]})
    assert "files 0 to 1, not 2" in refused(agent, "BadArgument", "ImportProcess.write",
                                            pid, 2, 0, b"x")
    assert "files 0 to 1" in refused(agent, "BadArgument", "ImportProcess.getUploadOffset",
                                     pid, -1)
    assert "list of 2 hex" in refused(agent, "BadArgument", "ImportProcess.verifyUpload",
                                      pid, [sha(a)])
    assert "64 hex" in refused(agent, "BadArgument", "ImportProcess.verifyUpload",
                               pid, [sha(a), "nothex"])
    # the digests as one bin (the extension past 4,096 files): 32 bytes per file, exactly
    assert "2 32-byte digests" in refused(agent, "BadArgument", "ImportProcess.verifyUpload",
                                          pid, bytes.fromhex(sha(a)))
    assert "TooLarge" == _name_of(agent, "ImportProcess.write", pid, 1, 0, b"b" * 2001)
    send(agent, pid, 0, a)
    send(agent, pid, 1, b[:1500])
    message = refused(agent, "VerificationFailed", "ImportProcess.verifyUpload", pid,
                      [sha(a), sha(b)])
    assert message == "p/b: 1500 of 2000 bytes received"
    assert "call verifyUpload" in refused(agent, "NotVerified", "ImportProcess.getHandle", pid)
    send(agent, pid, 1, b, start=1500)
    wrong = sha(b"something else")
    message = refused(agent, "VerificationFailed", "ImportProcess.verifyUpload", pid,
                      [sha(a), wrong])
    assert message == f"p/b: expected {wrong}, got {sha(b)}"
    # the mount shows the same verdict: the client's hash was checked as a declaration
    attrs = task_attrs(agent.uploads / "p" / "b")
    assert attrs["state"] == "failed" and wrong in attrs["error"]
    # none of the process's files was imported ("plain", written through the mount
    # above, is an upload of its own and may be imported by now)
    assert [j for j in import_jobs(agent.mount) if j["Spec"].get("root") == "p"] == []
    refused(agent, "NotVerified", "ImportProcess.getHandle", pid)
    # the right hashes now: the same bytes verified against them, and imported
    job = call(agent, "ImportProcess.verifyUpload", pid,
               bytes.fromhex(sha(a)) + bytes.fromhex(sha(b)))
    assert task_attrs(agent.uploads / "p" / "b")["state"] == "complete"
    assert call(agent, "ImportProcess.getHandle", pid) == job
    assert call(agent, "ImportProcess.verifyUpload", pid, [sha(a), sha(b)]) == job


def _name_of(agent, method, *params) -> str:
    with pytest.raises(RpcError) as caught:
        call(agent, method, *params)
    return caught.value.name


def test_more_than_4096_files_in_one_call_are_refused():
    """The server's msgpack limit refuses a longer list before it is decoded; the check
    behind it says why, for a transport without that limit."""
    from fsagent.uploads._processes import check_files
    with pytest.raises(RpcError, match="4097 files in one call; at most 4096"):
        check_files([{"path": f"f{i}", "size": 0} for i in range(4097)])
    assert len(check_files([{"path": f"f{i}", "size": 0} for i in range(4096)])) == 4096


# -- resume after kill -9 ----------------------------------------------------------------------


def test_kill9_mid_upload_then_create_again_resumes_from_the_durable_offset(agent_factory):
    agent = agent_factory(config=QUICK).start()
    big, small = os.urandom(3 << 20), os.urandom(10_000)
    spec = {"root": "resume", "files": [{"path": "big.raw", "size": len(big),
                                         "sha256": sha(big)},
                                        {"path": "small.txt", "size": len(small)}]}
    pid = call(agent, "ImportProcess.create", spec)
    half = len(big) // 2
    assert send(agent, pid, 0, big[:half], chunk=256 << 10) == half
    assert call(agent, "ImportProcess.getUploadOffset", pid, 0) == half  # durable now
    assert send(agent, pid, 0, big[:half + 300_000], start=half) == half + 300_000
    agent.kill9()
    agent.start()
    assert agent.status()["previous_run_clean"] is False
    assert call(agent, "ImportProcess.create", spec) == pid
    offset = call(agent, "ImportProcess.getUploadOffset", pid, 0)
    assert half <= offset <= half + 300_000
    assert os.stat(agent.uploads / "resume" / "big.raw").st_size == offset
    assert (agent.uploads / "resume" / "big.raw").read_bytes() == big[:offset]
    assert call(agent, "ImportProcess.getUploadOffset", pid, 1) == 0
    assert send(agent, pid, 0, big, chunk=256 << 10, start=offset) == len(big)
    assert send(agent, pid, 1, small) == len(small)
    job = call(agent, "ImportProcess.verifyUpload", pid, [sha(big), sha(small)])
    assert call(agent, "ImportProcess.getHandle", pid) == job
    for name, data in (("big.raw", big), ("small.txt", small)):
        path = agent.uploads / "resume" / name
        assert path.read_bytes() == data
        assert task_attrs(path)["state"] == "complete" and task_attrs(path)["job"] == job
    wait_for(lambda: [job_state(j) for j in import_jobs(agent.mount)] == ["success"],
             what="the one import")
    # and after another restart the process is finished: the same create is a new one
    agent.stop()
    agent.start()
    assert call(agent, "ImportProcess.getHandle", pid) == job
    assert call(agent, "ImportProcess.getProcess", pid)["job"] == job


def test_writes_in_flight_on_one_connection_land_in_order(agent):
    """A client may keep many chunks in flight: the agent runs each request in its own
    task, in no promised order, and still applies them in offset order."""
    data = os.urandom(12 << 20)
    chunk = 256 << 10  # over the inline size: applied in worker threads, so they overlap

    async def go():
        async with open_client(agent.socket) as client:
            pid = await client.call("ImportProcess.create", {
                "root": "", "files": [{"path": "inflight.bin", "size": len(data)}]})
            results = {}
            async with trio.open_nursery() as nursery:
                for off in range(0, len(data), chunk):
                    async def one(off=off):
                        results[off] = await client.call("ImportProcess.write", pid, 0, off,
                                                         data[off:off + chunk])
                    nursery.start_soon(one)
                    await trio.sleep(0)
            assert results == {off: off + min(chunk, len(data) - off)
                               for off in range(0, len(data), chunk)}
            return await client.call("ImportProcess.verifyUpload", pid, [sha(data)])

    job = trio.run(go)
    assert (agent.uploads / "inflight.bin").read_bytes() == data
    assert task_attrs(agent.uploads / "inflight.bin")["job"] == job


def test_add_files_then_one_import_of_all(agent_factory):
    agent = agent_factory(config=QUICK + 'import_grouping = "file"\n').start()
    first, more = os.urandom(1000), [os.urandom(500), os.urandom(600)]
    pid = call(agent, "ImportProcess.create", {"root": "set", "files": [
        {"path": "one", "size": len(first), "sha256": sha(first)}]})
    assert call(agent, "ImportProcess.addFiles", pid, [
        {"path": "two", "size": 500}, {"path": "three/x", "size": 600}]) is None
    assert "named twice" in refused(agent, "BadArgument", "ImportProcess.addFiles", pid,
                                    [{"path": "one", "size": 1}])
    send(agent, pid, 0, first)
    send(agent, pid, 1, more[0])
    send(agent, pid, 2, more[1])
    # `file` grouping would import each alone: a process is one set, whatever it says
    wait_for(lambda: all(f["state"] == "complete" for f in
                         call(agent, "ImportProcess.getProcess", pid)["files"]),
             what="three complete files")
    assert import_jobs(agent.mount) == []
    job = call(agent, "ImportProcess.verifyUpload", pid, [sha(first)] + [sha(m) for m in more])
    wait_for(lambda: [job_state(j) for j in import_jobs(agent.mount)] == ["success"],
             what="the one import")
    assert sorted(m["path"] for m in members_of(import_jobs(agent.mount)[0])) == [
        "set/one", "set/three/x", "set/two"]
    assert "was submitted as job" in refused(agent, "AlreadyVerified", "ImportProcess.addFiles",
                                             pid, [{"path": "four", "size": 1}])
    assert call(agent, "ImportProcess.getHandle", pid) == job


# -- owners -----------------------------------------------------------------------------------

CLIENT = textwrap.dedent("""
    import json, sys, trio
    from fsagent.rpc import RpcError, open_client

    def decode(v):
        if isinstance(v, dict) and "$bytes" in v:
            return bytes.fromhex(v["$bytes"])
        return v

    async def main():
        out = []
        async with open_client(sys.argv[1]) as client:
            for method, *params in json.loads(sys.argv[2]):
                try:
                    out.append({"ok": await client.call(method, *map(decode, params))})
                except RpcError as e:
                    out.append({"error": [e.name, e.message]})
        print(json.dumps(out))

    trio.run(main)
""")


def as_user(user, gid, sock, *steps):
    """Run calls as ``user`` (a real other uid over the Unix socket); their results."""
    steps = [[m, *({"$bytes": p.hex()} if isinstance(p, bytes) else p for p in ps)]
             for m, *ps in steps]
    done = user.run_in_groups([gid], sys.executable, "-c", CLIENT, str(sock), json.dumps(steps),
                              cwd=os.getcwd(), env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_only_the_owner_and_root_write_delete_or_verify(shared_dir, agent_factory, other_user,
                                                         third_user, test_group):
    name, gid = test_group
    sock = shared_dir / "rpc.sock"
    agent = agent_factory(config=QUICK + f'allow_other = true\nrpc_group = "{name}"\n'
                          f'socket = "{sock}"\n',
                          mount=shared_dir / "mnt", state=shared_dir / "state").start()
    root_task = call_at(sock, "UploadTasks.create",
                        {"path": "root.bin", "fileSize": 4})["newResourceID"]
    pid = call_at(sock, "ImportProcess.create", {"root": "rootset",
                                                 "files": [{"path": "a", "size": 3}]})
    results = as_user(
        other_user, gid, sock,
        ["UploadTasks.write", root_task, 0, b"mine"],
        ["UploadTasks.delete", root_task],
        ["ImportProcess.write", pid, 0, 0, b"abc"],
        ["ImportProcess.verifyUpload", pid, [sha(b"abc")]],
        ["ImportProcess.addFiles", pid, [{"path": "b", "size": 1}]],
        ["UploadTasks.create", {"path": "root.bin"}],
        ["ImportProcess.create", {"root": "", "files": [{"path": "root.bin", "size": 4}]}],
        # reading is open
        ["UploadTasks.get", root_task],
        ["ImportProcess.getProcess", pid],
        ["ImportProcess.getUploadOffset", pid, 0],
        # its own upload: created as that user, in its own directory
        ["UploadTasks.create", {"path": "theirs/x.bin", "fileSize": 2}],
    )
    for r in results[:7]:
        assert r["error"][0] == "PermissionDenied", results
    assert "belongs to uid 0" in results[0]["error"][1]
    assert results[7]["ok"]["owner"] == 0 and results[8]["ok"]["owner"] == 0
    assert results[9]["ok"] == 0
    theirs = results[10]["ok"]["newResourceID"]
    st = os.stat(agent.uploads / "theirs" / "x.bin")
    assert (st.st_uid, os.stat(agent.uploads / "theirs").st_uid) == (other_user.uid,) * 2
    assert (agent.state / "data" / "uploads" / "theirs" / "x.bin").stat().st_uid == other_user.uid
    # nothing of root's changed
    assert (agent.uploads / "root.bin").read_bytes() == b""
    assert call_at(sock, "ImportProcess.getUploadOffset", pid, 0) == 0
    # a third user may neither write the other's task nor create in its directory
    results = as_user(third_user, gid, sock, ["UploadTasks.write", theirs, 0, b"hi"],
                      ["UploadTasks.create", {"path": "theirs/y.bin"}])
    assert [r["error"][0] for r in results] == ["PermissionDenied"] * 2, results
    # the owner may, and root may
    results = as_user(other_user, gid, sock, ["UploadTasks.write", theirs, 0, b"h"])
    assert results == [{"ok": 1}]
    assert call_at(sock, "UploadTasks.write", theirs, 1, b"i") == 2
    assert call_at(sock, "UploadTasks.get", theirs)["owner"] == other_user.uid
    assert call_at(sock, "UploadTasks.delete", theirs) == {"succeed": True}
    # A directory's group write bit counts for the members of its group, as on a disk:
    # root's "lab" (group gid, 0770) takes the third user's file, "ro" (0750) does not.
    for directory, mode in (("lab", 0o770), ("ro", 0o750)):
        os.mkdir(agent.uploads / directory)
        os.chown(agent.uploads / directory, 0, gid)
        os.chmod(agent.uploads / directory, mode)
    results = as_user(third_user, gid, sock, ["UploadTasks.create", {"path": "lab/z.bin"}],
                      ["UploadTasks.create", {"path": "ro/z.bin"}])
    assert "ok" in results[0], results
    assert results[1]["error"][0] == "PermissionDenied", results
    assert os.stat(agent.uploads / "lab" / "z.bin").st_uid == third_user.uid
    assert not os.path.exists(agent.uploads / "ro" / "z.bin")


def call_at(sock, method, *params):
    async def go():
        async with open_client(sock) as client:
            return await client.call(method, *params)
    return trio.run(go)


# -- a third-party client ---------------------------------------------------------------------


def test_pynvim_session_drives_upload_tasks_and_import_process(agent):
    s = socket_session(str(agent.socket))
    s.error_wrapper = lambda err: RuntimeError(f"{text(err[0])}: {text(err[1])}")
    try:
        settings = text(s.request("ImportProcess.getImportSettings"))
        assert settings["clientHash"] == "sha256" and settings["maxFilesPerCall"] == 4096
        assert settings["importGrouping"] == "directory"
        files = [os.urandom(100_000), b"small"]
        pid = text(s.request("ImportProcess.create", {"root": "nvim", "files": [
            {"path": "a.bin", "size": len(files[0])}, {"path": "b.txt", "size": 5}]}))
        for i, data in enumerate(files):
            offset = s.request("ImportProcess.getUploadOffset", pid, i)
            while offset < len(data):
                offset = s.request("ImportProcess.write", pid, i, offset,
                                   data[offset:offset + 30_000])
        with pytest.raises(RuntimeError, match="BadOffset: nvim/b.txt: write at 0, but the "
                                               "current offset is 5"):
            s.request("ImportProcess.write", pid, 1, 0, b"x")
        job = text(s.request("ImportProcess.verifyUpload", pid, [sha(d) for d in files]))
        assert text(s.request("ImportProcess.getHandle", pid)) == job
        created = text(s.request("UploadTasks.create", {"path": "nvim/c.dat", "fileSize": 3,
                                                        "sha256": sha(b"abc")}))
        task = created["newResourceID"]
        assert s.request("UploadTasks.write", task, 0, b"abc") == 3
        assert wait_for(lambda: text(s.request("UploadTasks.get", task))["state"] == "complete",
                        what="c.dat complete")
        listed = {r["taskID"]: r for r in text(s.request("UploadTasks.list"))}
        assert listed[task]["sha256"] == sha(b"abc")
        assert text(s.request("UploadTasks.delete", task)) == {"succeed": True}
        with pytest.raises(RuntimeError, match="NoSuchTask"):
            s.request("UploadTasks.get", task)
    finally:
        s.close()
    assert (agent.uploads / "nvim" / "a.bin").read_bytes() == files[0]
    assert task_attrs(agent.uploads / "nvim" / "b.txt")["job"] == job


def test_over_tcp_the_token_holder_uploads_as_the_agent(agent_factory):
    token = "upload-token-0123456789abcdef"
    agent = agent_factory(config=QUICK + f'rpc_tcp_listen = "127.0.0.1:0"\n'
                          f'rpc_token = "{token}"\n').start()
    host, port = agent.status()["rpc"]["tcp"][0].rsplit(":", 1)
    data = os.urandom(123_456)

    async def go():
        async with open_client(tcp=(host, int(port)), token=token) as client:
            pid = await client.call("ImportProcess.create", {
                "root": "tcp", "files": [{"path": "t.bin", "size": len(data)}]})
            offset = 0
            while offset < len(data):
                offset = await client.call("ImportProcess.write", pid, 0, offset,
                                           data[offset:offset + 50_000])
            job = await client.call("ImportProcess.verifyUpload", pid, [sha(data)])
            return job, await client.call("ImportProcess.getProcess", pid)

    job, process = trio.run(go)
    assert process["owner"] == os.getuid() and process["job"] == job
    assert os.stat(agent.uploads / "tcp" / "t.bin").st_uid == os.getuid()
    assert (agent.uploads / "tcp" / "t.bin").read_bytes() == data
