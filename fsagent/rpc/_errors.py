"""The errors an RPC method raises, and how they travel: ``[name, message]``.

Design notes
------------
* A method reports an expected failure by raising ``RpcError(name, message)``; the
  server sends ``[name, message]`` as the response's error, which is what pynvim and
  other clients expect (pynvim raises ``Exception(error[1])``). ``OmeroFSError`` is
  the name OMERO.fs's API uses for every FileServer/MonitorServer failure.
* The client raises the same class when it receives an error, so code on either side
  of the socket catches the same thing.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RpcError", "OmeroFSError", "NO_SUCH_METHOD", "INVALID_PARAMS", "INTERNAL_ERROR"]

NO_SUCH_METHOD = "NoSuchMethod"
INVALID_PARAMS = "InvalidParams"
INTERNAL_ERROR = "InternalError"
AUTH_REQUIRED = "AuthenticationRequired"
AUTH_FAILED = "AuthenticationFailed"


class RpcError(Exception):
    """An error reply: ``name`` says what kind, ``message`` is one line for a human."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message

    def to_wire(self) -> list[str]:
        return [self.name, self.message]

    @classmethod
    def from_wire(cls, error: Any) -> RpcError:
        """Whatever a peer sent as an error, as an RpcError (lenient: peers vary)."""
        if isinstance(error, (list, tuple)) and len(error) == 2:
            name, message = (e.decode(errors="replace") if isinstance(e, bytes) else str(e)
                             for e in error)
            if name == OmeroFSError.NAME:
                return OmeroFSError(message)
            return cls(name, message)
        return cls("Error", repr(error))


class OmeroFSError(RpcError):
    """OMERO.fs's one exception type: a path that cannot be served, a bad monitor id, ..."""

    NAME = "OmeroFSError"

    def __init__(self, message: str):
        super().__init__(self.NAME, message)
