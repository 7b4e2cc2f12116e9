"""The sans-IO msgpack-RPC core, on bytes only: no sockets, no trio."""

from __future__ import annotations

import os

import msgpack
import pytest

from fsagent.rpc import (NEED_DATA, Connection, LocalProtocolError, Notification,
                         ProtocolError, Request, Response)
from fsagent.rpc._protocol import SPLIT_FRAME_BYTES


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def events(conn: Connection) -> list:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if isinstance(ev, ProtocolError):
            break
    return out


def test_request_fed_one_byte_at_a_time():
    conn = Connection()
    data = pack([0, 0, "FileServer.getSize", ["/data/a"]])
    for b in data[:-1]:
        conn.receive_data(bytes([b]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(data[-1:])
    assert conn.next_event() == Request(0, "FileServer.getSize", ["/data/a"])
    assert conn.next_event() is NEED_DATA


def test_pipelined_requests_in_one_read_and_split_across_reads():
    conn = Connection()
    frames = b"".join(pack([0, i, "m", [i]]) for i in range(50))
    conn.receive_data(frames[:333])
    first = events(conn)
    conn.receive_data(frames[333:])
    rest = events(conn)
    assert [e.msgid for e in first + rest] == list(range(50))
    assert all(isinstance(e, Request) and e.params == [e.msgid] for e in first + rest)


def test_bin_method_names_are_accepted():
    conn = Connection()
    conn.receive_data(pack([0, 7, b"MonitorServer.sync", ["x"]]) + pack([2, b"nvim_note", []]))
    assert events(conn) == [Request(7, "MonitorServer.sync", ["x"]),
                            Notification("nvim_note", [])]


def test_out_of_order_replies_match_their_requests():
    client = Connection()
    ids = [client.send_request("m", [n])[0] for n in range(3)]
    assert ids == [0, 1, 2]  # msgid may start at 0
    client.receive_data(pack([1, 2, None, "c"]) + pack([1, 0, None, "a"])
                        + pack([1, 1, ["OmeroFSError", "no"], None]))
    assert events(client) == [Response(2, None, "c"), Response(0, None, "a"),
                              Response(1, ["OmeroFSError", "no"], None)]
    assert client.awaiting_replies == 0


def test_server_answers_in_any_order_and_not_twice():
    server = Connection()
    server.receive_data(pack([0, 1, "a", []]) + pack([0, 2, "b", []]))
    assert len(events(server)) == 2
    assert msgpack.unpackb(server.send_response(2, None, 42)) == [1, 2, None, 42]
    assert msgpack.unpackb(server.send_response(1, ["E", "m"], None)) == [1, 1, ["E", "m"], None]
    with pytest.raises(LocalProtocolError):
        server.send_response(1, None, 0)
    with pytest.raises(LocalProtocolError):
        server.send_response(99, None, 0)


def test_notifications_serialise_as_spec():
    conn = Connection()
    assert msgpack.unpackb(conn.send_notification("fsEventHappened", ["id", []])) == [
        2, "fsEventHappened", ["id", []]]


def test_names_that_are_not_utf8_go_out_as_bin_and_the_rest_is_untouched():
    odd = "/data/\udcff\udcfe.tif"  # os.fsdecode(b"/data/\xff\xfe.tif")
    conn = Connection()
    batch = [{"fileId": odd, "type": "Create"}, {"fileId": "/data/ok.tif", "type": "Create"}]
    assert msgpack.unpackb(conn.send_notification("fsEventHappened", ["m", batch])) == [
        2, "fsEventHappened", ["m", [{"fileId": b"/data/\xff\xfe.tif", "type": "Create"},
                                     {"fileId": "/data/ok.tif", "type": "Create"}]]]
    server = Connection()
    server.receive_data(pack([0, 3, "FileServer.getDirectory", ["/data", ""]]))
    assert events(server) == [Request(3, "FileServer.getDirectory", ["/data", ""])]
    reply = msgpack.unpackb(server.send_response(3, None, [odd, ("x", {odd: 1})]))
    assert reply == [1, 3, None, [b"/data/\xff\xfe.tif", ["x", {b"/data/\xff\xfe.tif": 1}]]]
    # the packer is clean afterwards: the next message is not polluted by the failed try
    assert msgpack.unpackb(conn.send_notification("n", [1])) == [2, "n", [1]]


@pytest.mark.parametrize("garbage, reason", [
    (pack({"not": "an array"}), "non-empty array"),
    (pack([]), "non-empty array"),
    (pack([7, 1, "m", []]), "unknown message type"),
    (pack([0, 1, "m"]), "4 elements"),
    (pack([0, -1, "m", []]), "uint32"),
    (pack([0, 2**32, "m", []]), "uint32"),
    (pack([0, 1, 5, []]), "str or bin"),
    (pack([0, 1, b"\xff\xfe", []]), "str or bin"),
    (pack([0, 1, "m", "not params"]), "params"),
    (pack([2, "m"]), "3 elements"),
    (pack([1, 5, None, 1]), "never asked"),
    (b"\xc1", "undecodable"),                  # the one byte msgpack never uses
    (b"\xa3\xff\xfe\xfd", "undecodable"),      # a str that is not UTF-8
    (pack([True, 1, "m", []]), "unknown message type"),
])
def test_garbage_is_a_sticky_protocol_error(garbage, reason):
    conn = Connection()
    conn.receive_data(garbage)
    err = conn.next_event()
    assert isinstance(err, ProtocolError) and reason in err.reason, err
    conn.receive_data(pack([0, 1, "m", []]))
    assert conn.next_event() is err  # dead from now on


def test_a_reused_in_flight_msgid_is_an_error():
    conn = Connection()
    conn.receive_data(pack([0, 3, "m", []]) * 2)
    first, second = events(conn)
    assert isinstance(first, Request)
    assert isinstance(second, ProtocolError) and "reused" in second.reason
    # Once answered, the id is free again.
    conn2 = Connection()
    conn2.receive_data(pack([0, 3, "m", []]))
    events(conn2)
    conn2.send_response(3, None, 1)
    conn2.receive_data(pack([0, 3, "m", []]))
    assert events(conn2) == [Request(3, "m", [])]


def test_oversized_message_is_refused_without_buffering_it_all():
    conn = Connection(max_message_size=1024)
    big = pack([0, 1, "m", ["x" * 5000]])
    conn.receive_data(big[:800])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(big[800:])
    err = conn.next_event()
    assert isinstance(err, ProtocolError) and ("larger" in err.reason or "exceeds" in err.reason)
    assert conn.buffered_bytes <= 1024


def test_endless_stream_without_a_message_boundary_hits_the_limit():
    conn = Connection(max_message_size=4096)
    conn.receive_data(b"\xdb\x00\x01\x00\x00")  # str32 announcing 64 KiB
    result = None
    for _ in range(100):
        conn.receive_data(b"a" * 1000)
        result = conn.next_event()
        if isinstance(result, ProtocolError):
            break
    assert isinstance(result, ProtocolError)


def test_announced_huge_array_is_refused_before_allocation():
    conn = Connection()
    conn.receive_data(b"\xdd\x7f\xff\xff\xff")  # array32 with 2**31-1 elements
    assert isinstance(conn.next_event(), ProtocolError)


def test_many_messages_larger_in_total_than_the_limit_are_fine():
    conn = Connection(max_message_size=256)
    frames = b"".join(pack([0, i, "m", ["y" * 100]]) for i in range(100))
    conn.receive_data(frames)
    got = events(conn)
    assert len(got) == 100 and all(isinstance(e, Request) for e in got)


@pytest.mark.parametrize("size", [SPLIT_FRAME_BYTES - 1, SPLIT_FRAME_BYTES, 70_000,
                                  4 * 2**20 + 17])
@pytest.mark.parametrize("kind", [bytes, bytearray])
def test_a_large_last_param_goes_out_uncopied_in_the_same_frame(size, kind):
    # ImportProcess.write's chunk: the frame must be byte for byte what msgpack packs
    # (the wire API is unchanged), and a large payload must be the caller's own object.
    payload = kind(os.urandom(size))
    non_utf8 = "scan-\udcff.tif"  # a name os.fsdecode gives for a non-UTF-8 byte
    params = ["3f2a-pid", 7, 2**40 + 5, non_utf8, payload]
    client = Connection()
    msgid, parts = client.send_request_parts("ImportProcess.write", params)
    expected = pack([0, msgid, "ImportProcess.write",
                     params[:3] + [os.fsencode(non_utf8), bytes(payload)]])
    assert b"".join(parts) == expected
    if size >= SPLIT_FRAME_BYTES:
        assert len(parts) == 2 and parts[1] is payload
        assert parts[0][-5:] == b"\xc6" + size.to_bytes(4, "big")
    else:
        assert len(parts) == 1
    server = Connection(max_message_size=8 * 2**20)
    for part in parts:
        server.receive_data(bytes(part))
    assert events(server) == [Request(msgid, "ImportProcess.write",
                                      params[:3] + [os.fsencode(non_utf8), bytes(payload)])]
    # The msgid is booked like send_request's: its reply is accepted, once.
    client.receive_data(server.send_response(msgid, None, 42))
    assert events(client) == [Response(msgid, None, 42)]
    assert client.send_request("next", [])[0] == msgid + 1


def test_request_parts_without_a_large_last_param_are_one_packed_frame():
    conn = Connection()
    for params in ([], [b"x" * 10], [os.urandom(SPLIT_FRAME_BYTES), 1], ["s" * 100_000]):
        msgid, parts = conn.send_request_parts("m", params)
        assert parts == [pack([0, msgid, "m", params])]
