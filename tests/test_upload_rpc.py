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


def test_import_process_three_files_one_job_as_the_mount_shows_it(agent):
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
