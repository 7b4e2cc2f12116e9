"""Fuzzing: random and mutated frames never take the agent down or grow its memory."""

from __future__ import annotations

import socket

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import PATIENCE
from rpcutil import export_agent, rss_kib

VALID = [
    [0, 1, "FileServer.getSize", ["/x"]],
    [0, 2, b"MonitorServer.getMonitorState", ["id"]],
    [2, "note", [1, 2]],
    [0, 4294967295, "FileServer.getStats", ["/"]],
]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**64, 2**64 - 1), st.floats(),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=5), max_leaves=20)


def _pack(value) -> bytes:
    try:
        return msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"


frames = st.one_of(
    st.binary(max_size=512),                                   # random bytes
    values.map(_pack),                                         # random msgpack values
    st.tuples(st.sampled_from(VALID), st.integers(0, 40), st.binary(min_size=1, max_size=4))
    .map(lambda t: _mutate(msgpack.packb(t[0], use_bin_type=True), t[1], t[2])),
    st.lists(values, min_size=1, max_size=5).map(lambda v: _pack([0, 9, "x", v])),
)


def _mutate(frame: bytes, at: int, junk: bytes) -> bytes:
    at %= len(frame)
    return frame[:at] + junk + frame[at + len(junk):]


def test_fuzzed_frames(agent_factory, tmp_path):
    agent, data = export_agent(agent_factory, tmp_path, config="rpc_max_message_bytes = 65536\n")
    probe = msgpack.packb([0, 0, "MonitorServer.getMonitorState", ["probe"]])

    def exchange(payload: bytes) -> None:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(PATIENCE)
            s.connect(str(agent.socket))
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # read until the agent closes
                pass

    baseline = None

    @settings(max_examples=400, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames, min_size=1, max_size=4))
    def one(chunks):
        nonlocal baseline
        exchange(b"".join(chunks))
        if baseline is None:
            baseline = rss_kib(agent.proc.pid)

    one()
    # The agent is up and answers a well-formed request.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(PATIENCE)
        s.connect(str(agent.socket))
        s.sendall(probe)
        unpacker = msgpack.Unpacker(raw=False)
        replies = []
        while not replies and (more := s.recv(65536)):  # a stream: it may come in parts
            unpacker.feed(more)
            replies = list(unpacker)
        assert replies == [[1, 0, ["OmeroFSError", "no such monitor: 'probe'"], None]]
    grown = rss_kib(agent.proc.pid) - baseline
    assert grown < 32 * 1024, f"agent grew by {grown} KiB while fuzzed"
    assert agent.proc.poll() is None
