"""msgpack-RPC as a sans-IO state machine: bytes in, events out; messages in, bytes out.

Design notes
------------
* **No I/O here** (the h11 way). ``Connection.receive_data(bytes)`` buffers what the
  peer sent; ``Connection.next_event()`` returns one ``Request``, ``Response``,
  ``Notification``, ``ProtocolError`` or ``NEED_DATA``. ``send_request``,
  ``send_response`` and ``send_notification`` return the bytes to write. The trio
  server and client are thin loops around this object, and the tests drive it with
  plain bytes: fragmented frames, pipelined frames, out-of-order replies, garbage.
* **The wire format** (msgpack-RPC spec): request ``[0, msgid, method, params]``,
  response ``[1, msgid, error, result]``, notification ``[2, method, params]``.
  ``msgid`` is a uint32 and may start at 0; ``method`` may be a msgpack str or bin
  (pynvim sends bin); ``params`` is an array. Anything else is a protocol error.
* **Bounded memory.** ``max_message_size`` bounds the bytes buffered for one
  message: data is fed to the unpacker in slices no larger than the room left, so a
  peer that streams an endless message hits the limit instead of our RAM. msgpack
  pre-allocates arrays and maps when it reads their header, so their element counts
  are capped too (``max_container_len``): a 5-byte frame cannot claim gigabytes.
* **Errors are sticky.** After a ``ProtocolError`` event the connection is dead:
  every later ``next_event`` returns the same error, so the I/O layer closes the
  transport with the logged reason. Our own mistakes (answering a request twice or
  one that was never received) raise ``LocalProtocolError`` instead.
* **File names that are not UTF-8.** Paths reach us from ``os.fsdecode``, so a name
  that is not UTF-8 is a ``str`` with lone surrogates, which a msgpack str cannot
  carry. Such a string goes out as msgpack **bin** holding the name's raw bytes (every
  method that takes a path accepts bin too), so one odd file name in an instrument
  folder costs one field's type, not the whole message or the monitor sending it.
* **Large payloads are not copied on the way out.** ``send_request_parts`` returns a
  request as ``[head, payload]`` when its last parameter is a large ``bytes``: the same
  bytes on the wire as ``send_request``, without packing the payload into a new buffer
  (two copies of every byte of an upload).
* **Message ids.** A request's msgid must not reuse one still in flight (replies
  would be ambiguous); a response must answer a request we sent and have not yet
  seen answered. Both are checked here, so neither end needs its own bookkeeping.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

__all__ = [
    "Connection", "Request", "Response", "Notification", "ProtocolError",
    "LocalProtocolError", "NEED_DATA", "REQUEST", "RESPONSE", "NOTIFICATION",
    "DEFAULT_MAX_MESSAGE_SIZE", "SPLIT_FRAME_BYTES",
]

REQUEST, RESPONSE, NOTIFICATION = 0, 1, 2
MAX_MSGID = 2**32 - 1
DEFAULT_MAX_MESSAGE_SIZE = 32 * 2**20
# Largest element count of one array/map a peer may announce; msgpack allocates
# 8 bytes per announced element before the elements arrive.
DEFAULT_MAX_CONTAINER_LEN = 4096
# ``send_request_parts`` sends a last parameter of at least this many bytes without
# copying it; below, one packed frame (one write) is cheaper than two buffers. At least
# 65,536, so such a payload always takes msgpack's bin32 header.
SPLIT_FRAME_BYTES = 64 * 1024
MAX_BIN32 = 2**32 - 1
_EMPTY_BIN = b"\xc4\x00"


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    msgid: int
    method: str
    params: list


@dataclasses.dataclass(frozen=True, slots=True)
class Response:
    msgid: int
    error: Any
    result: Any


@dataclasses.dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: list


@dataclasses.dataclass(frozen=True, slots=True)
class ProtocolError:
    """The peer broke the protocol; ``reason`` is one line for the log. Terminal."""

    reason: str


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()

Event = Request | Response | Notification | ProtocolError | _NeedData


class LocalProtocolError(Exception):
    """We tried to send something the protocol forbids (a bug on our side)."""


def _method_name(raw: Any) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None
    return None


def _valid_msgid(msgid: Any) -> bool:
    return type(msgid) is int and 0 <= msgid <= MAX_MSGID


class Connection:
    """One end of a msgpack-RPC connection; symmetric (either end may send requests)."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_container_len: int = DEFAULT_MAX_CONTAINER_LEN):
        if max_message_size < 16:
            raise ValueError("max_message_size must be at least 16 bytes")
        self.max_message_size = max_message_size
        self._unpacker = msgpack.Unpacker(
            raw=False, strict_map_key=False, use_list=True,
            max_buffer_size=max_message_size,
            max_str_len=max_message_size, max_bin_len=max_message_size,
            max_ext_len=max_message_size,
            max_array_len=max_container_len, max_map_len=max_container_len,
        )
        self._packer = msgpack.Packer(use_bin_type=True)
        self._pending_input = bytearray()   # received, not yet handed to the unpacker
        self._fed = 0                       # bytes handed to the unpacker so far
        self._error: ProtocolError | None = None
        self._next_msgid = 0
        self._awaiting_reply: set[int] = set()   # msgids of requests we sent
        self._unanswered: set[int] = set()       # msgids of requests we received

    # -- state the I/O layer may look at --------------------------------------------------

    @property
    def error(self) -> ProtocolError | None:
        return self._error

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._pending_input) + self._fed - self._unpacker.tell()

    @property
    def awaiting_replies(self) -> int:
        return len(self._awaiting_reply)

    @property
    def unanswered_requests(self) -> int:
        return len(self._unanswered)

    # -- input ----------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer. ``b""`` is not special here; EOF is the I/O layer's."""
        if self._error is not None:
            return
        room = self.max_message_size - (self._fed - self._unpacker.tell())
        if not self._pending_input and len(data) <= room:
            # The common case: straight into the unpacker, one copy fewer (readBlock's
            # throughput is mostly copies).
            self._unpacker.feed(data)
            self._fed += len(data)
        else:
            self._pending_input += data

    def next_event(self) -> Event:
        if self._error is not None:
            return self._error
        while True:
            try:
                message = self._unpacker.unpack()
            except msgpack.OutOfData:
                if not self._feed_more():
                    if self._fed - self._unpacker.tell() >= self.max_message_size:
                        return self._fail(f"message larger than {self.max_message_size} bytes")
                    return NEED_DATA
                continue
            except Exception as e:  # ExtraData, FormatError, StackError, ValueError, ...
                return self._fail(f"undecodable msgpack: {type(e).__name__}: {e}")
            return self._interpret(message)

    def _feed_more(self) -> bool:
        """Move as much pending input into the unpacker as the size limit allows."""
        if not self._pending_input:
            return False
        room = self.max_message_size - (self._fed - self._unpacker.tell())
        if room <= 0:
            return False
        chunk = bytes(self._pending_input[:room])
        del self._pending_input[:room]
        self._unpacker.feed(chunk)
        self._fed += len(chunk)
        return True

    def _fail(self, reason: str) -> ProtocolError:
        self._error = ProtocolError(reason)
        self._pending_input.clear()
        return self._error

    def _interpret(self, message: Any) -> Event:
        if not isinstance(message, list) or not message:
            return self._fail(f"a message must be a non-empty array, got {type(message).__name__}")
        kind = message[0]
        if kind == REQUEST and type(kind) is int:
            if len(message) != 4:
                return self._fail(f"a request has 4 elements, got {len(message)}")
            _, msgid, raw_method, params = message
            method = _method_name(raw_method)
            if not _valid_msgid(msgid):
                return self._fail(f"request msgid must be a uint32, got {msgid!r:.40}")
            if method is None:
                return self._fail("request method must be a UTF-8 str or bin")
            if not isinstance(params, list):
                return self._fail(f"request params must be an array (msgid {msgid})")
            if msgid in self._unanswered:
                return self._fail(f"request msgid {msgid} reused while still in flight")
            self._unanswered.add(msgid)
            return Request(msgid, method, params)
        if kind == RESPONSE and type(kind) is int:
            if len(message) != 4:
                return self._fail(f"a response has 4 elements, got {len(message)}")
            _, msgid, error, result = message
            if not _valid_msgid(msgid) or msgid not in self._awaiting_reply:
                return self._fail(f"response to msgid {msgid!r:.40}, which we never asked")
            self._awaiting_reply.discard(msgid)
            return Response(msgid, error, result)
        if kind == NOTIFICATION and type(kind) is int:
            if len(message) != 3:
                return self._fail(f"a notification has 3 elements, got {len(message)}")
            _, raw_method, params = message
            method = _method_name(raw_method)
            if method is None:
                return self._fail("notification method must be a UTF-8 str or bin")
            if not isinstance(params, list):
                return self._fail("notification params must be an array")
            return Notification(method, params)
        return self._fail(f"unknown message type {kind!r:.40}")

    # -- output ---------------------------------------------------------------------------

    def send_request(self, method: str, params: list | tuple) -> tuple[int, bytes]:
        """Returns ``(msgid, bytes)``; the msgid is the one its ``Response`` will carry."""
        msgid = self._free_msgid()
        data = self._pack([REQUEST, msgid, method, list(params)])
        self._awaiting_reply.add(msgid)
        return msgid, data

    def send_request_parts(self, method: str,
                           params: list | tuple) -> tuple[int, list[bytes | bytearray]]:
        """``send_request`` as a list of buffers to write in order, without copying a
        large last parameter: the same bytes on the wire, one copy fewer per buffer.

        A request whose last parameter is ``bytes``/``bytearray`` of at least
        ``SPLIT_FRAME_BYTES`` (``ImportProcess.write``'s chunk) comes back as ``[head,
        payload]``: ``head`` is everything up to and including the payload's bin header
        and ``payload`` is the caller's object itself, not a copy. Packing it whole would
        copy every byte twice (into the packer's buffer, then into the returned
        ``bytes``), which is a third of an RPC upload's client CPU outside hashing.
        Anything else is ``[send_request(...)[1]]``.
        """
        params = list(params)
        payload = params[-1] if params else None
        if (not isinstance(payload, (bytes, bytearray))
                or not SPLIT_FRAME_BYTES <= len(payload) <= MAX_BIN32):
            msgid, data = self.send_request(method, params)
            return msgid, [data]
        msgid = self._free_msgid()
        # Packed with an empty bin in the payload's place, the frame ends with that
        # bin's header, which msgpack writes as bin8 of length 0 (c4 00); a payload
        # this large takes bin32 (c6 + 4-byte big-endian length) instead, which is
        # what msgpack would have written for it, so the frame is byte-identical.
        head = self._pack([REQUEST, msgid, method, params[:-1] + [b""]])
        if not head.endswith(_EMPTY_BIN):  # pragma: no cover - msgpack changed its format
            raise LocalProtocolError("msgpack did not pack an empty bin as c4 00")
        head = head[:-len(_EMPTY_BIN)] + b"\xc6" + len(payload).to_bytes(4, "big")
        self._awaiting_reply.add(msgid)
        return msgid, [head, payload]

    def _free_msgid(self) -> int:
        for _ in range(MAX_MSGID + 1):
            msgid = self._next_msgid
            self._next_msgid = (msgid + 1) & MAX_MSGID
            if msgid not in self._awaiting_reply:
                return msgid
        raise LocalProtocolError("no free msgid")  # pragma: no cover - 2**32 in flight

    def cancel_request(self, msgid: int) -> None:
        """Forget a request we sent (e.g. the caller gave up); a late reply is then an error
        unless the caller keeps it: so only use this when the connection is going away."""
        self._awaiting_reply.discard(msgid)

    def send_response(self, msgid: int, error: Any = None, result: Any = None) -> bytes:
        if msgid not in self._unanswered:
            raise LocalProtocolError(f"msgid {msgid} is not an unanswered request")
        data = self._pack([RESPONSE, msgid, error, result])
        self._unanswered.discard(msgid)
        return data

    def send_notification(self, method: str, params: list | tuple) -> bytes:
        return self._pack([NOTIFICATION, method, list(params)])

    def _pack(self, message: list) -> bytes:
        try:
            return self._packer.pack(message)
        except UnicodeEncodeError:
            # Rare (a name that is not UTF-8): pay for the walk only then.
            return self._packer.pack(_unencodable_as_bin(message))


def _unencodable_as_bin(value: Any) -> Any:
    """``value`` with every str that UTF-8 cannot encode replaced by its raw bytes."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape")
        return value
    if isinstance(value, (list, tuple)):
        return [_unencodable_as_bin(v) for v in value]
    if isinstance(value, dict):
        return {_unencodable_as_bin(k): _unencodable_as_bin(v) for k, v in value.items()}
    return value
