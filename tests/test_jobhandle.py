"""``JobHandle.*`` (OMERO's JobHandle, issue 13 part 3) on a live agent, driven by a
third-party msgpack-RPC client (pynvim's session) and checked against the files: one
engine, two faces."""

from __future__ import annotations

import json
import os
import sys
import zipfile

import pytest
from pynvim.msgpack_rpc import socket_session

from conftest import wait_for
from jobs_util import GATED_IMPORT, import_spec, open_gate, put, read, status
from rpcutil import text


class Session:
    def __init__(self, agent):
        self.s = socket_session(str(agent.socket))
        self.s.error_wrapper = lambda err: RuntimeError(f"{text(err[0])}: {text(err[1])}")

    def __call__(self, method, *args):
        return text(self.s.request(f"JobHandle.{method}", *args))

    def raw(self, method, *args):
        return self.s.request(f"JobHandle.{method}", *args)

    def close(self):
        self.s.close()


@pytest.fixture
def handle_agent(agent_factory):
    agent = agent_factory(config="max_concurrent_jobs = 1\n" + GATED_IMPORT).start()
    session = Session(agent)
    yield agent, session
    session.close()


def test_submit_attach_and_read_a_job_as_the_files_show_it(handle_agent):
    agent, h = handle_agent
    put(agent, "exp/a.tif", b"pixels" * 1000)
    job = h("submit", {"type": "archive", "paths": ["exp"], "compression": "store"})
    assert h("attach", job) in ("pending", "running", "success")
    assert wait_for(lambda: h("jobStatus", job) == "success", what="the archive")
    record = h("getJob", job)
    assert record == json.loads(read(agent.jobs / job / "info.json")) | {
        "Progress": record["Progress"], "EffectiveRuntime": record["EffectiveRuntime"]}
    assert record["Type"] == "archive" and record["Outputs"] == ["archive.zip"]
    assert h("jobFinished", job) == record["CompletionTime"] is not None
    assert h("jobRunning", job) is False and h("jobError", job) is False
    assert h("jobMessage", job) == read(agent.jobs / job / "message").rstrip("\n")
    # readOutput: the same bytes as outputs/archive.zip through the mount, in blocks
    whole = (agent.jobs / job / "outputs" / "archive.zip").read_bytes()
    got, offset = b"", 0
    while chunk := h.raw("readOutput", job, "archive.zip", offset, 4096):
        got += chunk
        offset += len(chunk)
    assert got == whole
    with zipfile.ZipFile(agent.jobs / job / "outputs" / "archive.zip") as z:
        assert z.read("exp/a.tif") == b"pixels" * 1000


def test_refusals_name_the_problem(handle_agent):
    agent, h = handle_agent
    with pytest.raises(RuntimeError, match="NoSuchJob: no job 'nope'"):
        h("attach", "nope")
    with pytest.raises(RuntimeError, match="BadSpec: spec needs \"type\""):
        h("submit", {"paths": ["x"]})
    with pytest.raises(RuntimeError, match="BadSpec: unknown job type 'zap'"):
        h("submit", {"type": "zap"})
    put(agent, "a.dat")
    job = h("submit", {"type": "archive", "paths": ["a.dat"]})
    wait_for(lambda: h("jobStatus", job) == "success", what="the archive")
    with pytest.raises(RuntimeError, match="NoSuchOutput: job '.*' has no output 'x.zip'"):
        h("readOutput", job, "x.zip", 0, 10)
    with pytest.raises(RuntimeError, match="NoSuchOutput"):
        h("readOutput", job, "../../fsagent.db", 0, 10)
    with pytest.raises(RuntimeError, match="BadArgument: size 99999999999 is over"):
        h("readOutput", job, "archive.zip", 0, 99999999999)
    with pytest.raises(RuntimeError, match="BadArgument: offset must be a non-negative"):
        h("readOutput", job, "archive.zip", -1, 10)
    with pytest.raises(RuntimeError, match="IllegalMove: job '.*': cannot set status "
                                           "'running' on a success job"):
        h("setStatus", job, "running")
    with pytest.raises(RuntimeError, match="IllegalMove: job '.*': cannot pause a success"):
        h("setStatus", job, "paused")
    with pytest.raises(RuntimeError, match="InvalidParams"):
        h("jobStatus")


def test_status_and_message_steer_the_same_engine_as_the_files(handle_agent):
    """A gated import runs (t1), a second waits: setStatus/cancelJob over RPC show in
    the files, and the control file's moves show over RPC."""
    agent, h = handle_agent
    running = h("submit", import_spec(agent, "run.dat", task="t1"))
    wait_for(lambda: h("jobRunning", running), what="the gated import to run")
    queued = h("submit", import_spec(agent, "q.dat", task="t2"))
    assert h("setStatus", queued, "paused") == "pending"
    assert status(agent.jobs / queued) == "paused"
    assert h("setStatusAndMessage", queued, "pending", "resumed by the pipeline") == "paused"
    assert status(agent.jobs / queued) == "pending"
    assert read(agent.jobs / queued / "message") == "resumed by the pipeline\n"
    assert h("setMessage", queued, "second note") == "resumed by the pipeline"
    assert h("jobMessage", queued) == "second note"
    # the files steer, RPC sees it
    (agent.jobs / queued / "control").write_text("cancel\n")
    assert h("jobStatus", queued) == "cancelled" and h("jobFinished", queued) is not None
    assert h("setStatus", queued, "cancelled") == "cancelled"  # already: no change
    assert h("setStatus", queued, "pending") == "cancelled"   # retry
    assert status(agent.jobs / queued) == "pending"
    assert h("cancelJob", queued) == "cancelled"
    assert status(agent.jobs / queued) == "cancelled"
    open_gate(agent, "run.dat")
    assert wait_for(lambda: h("jobStatus", running) == "success", what="the gated import")
    assert h("jobError", running) is False


def test_only_owner_and_root_may_steer_over_rpc(shared_dir, agent_factory, other_user,
                                                test_group):
    name, gid = test_group
    sock = shared_dir / "rpc.sock"
    agent = agent_factory(config="allow_other = true\nmax_concurrent_jobs = 1\n"
                          + GATED_IMPORT + f'rpc_group = "{name}"\nsocket = "{sock}"\n',
                          mount=shared_dir / "mnt", state=shared_dir / "state").start()
    h = socket_session(str(sock))
    try:
        job = text(h.request("JobHandle.submit", import_spec(agent, "r.dat", task="t1")))
    finally:
        h.close()
    wait_for(lambda: status(agent.jobs / job) == "running", what="root's job running")
    call = [sys.executable, "-m", "fsagent", "call", "--socket", str(sock)]
    for args in (["JobHandle.cancelJob", job], ["JobHandle.setStatus", job, "paused"],
                 ["JobHandle.setMessage", job, "mine now"]):
        refused = other_user.run_in_groups([gid], *call, *args)
        assert refused.returncode == 3, refused  # `fsagent call`: the agent refused
        assert "PermissionDenied: job" in refused.stderr and "belongs to uid 0" in refused.stderr
    seen = other_user.run_in_groups([gid], *call, "JobHandle.jobStatus", job)
    assert seen.returncode == 0 and "running" in seen.stdout  # reading is open
    assert status(agent.jobs / job) == "running"
    open_gate(agent, "r.dat")
