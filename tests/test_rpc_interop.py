"""A third-party client (pynvim's msgpack_rpc session) drives the agent."""

from __future__ import annotations

import os

import pytest
from pynvim.msgpack_rpc import socket_session

from rpcutil import export_agent


def test_pynvim_session_calls_and_receives_notifications(agent_factory, tmp_path):
    agent, data = export_agent(agent_factory, tmp_path)
    (data / "a.tif").write_bytes(b"12345")
    session = socket_session(str(agent.socket))
    session.error_wrapper = lambda err: Exception(err[1])  # what pynvim's Nvim does
    try:
        # pynvim sends method names as msgpack bin; the agent accepts them
        assert session.request("FileServer.getSize", str(data / "a.tif")) == 5
        assert session.request("FileServer.readBlock", str(data / "a.tif"), 1, 3) == b"234"
        with pytest.raises(Exception, match="not under an exported root: /etc/passwd"):
            session.request("FileServer.getSize", "/etc/passwd")
        with pytest.raises(Exception, match="no such method: nvim_get_api_info"):
            session.request("nvim_get_api_info")
        session.request("nvim_set_client_info", "x", {}, "remote", {}, {}, async_=True)
        mid = session.request("MonitorServer.createMonitor", "Persistent", ["All"], "Flat",
                              str(data), [], [], 0.0, 0, False, False, True, None)
        mid = mid.decode() if isinstance(mid, bytes) else mid
        session.request("MonitorServer.startMonitor", mid)
        (data / "b.tif").write_bytes(b"x")
        session.request("MonitorServer.sync", mid)  # notifications are queued before this reply
        kind, name, params = session.next_message()
        assert (kind, name) == ("notification", "fsEventHappened")
        assert params == [mid, [{"fileId": f"{data}/b.tif", "type": "Create"}]]
        assert session.request("MonitorServer.getMonitorState", mid) == "Started"
    finally:
        session.close()
    assert os.path.exists(agent.socket)
