"""``metrics_listen``: the metrics over HTTP, for a Prometheus that scrapes directly.

Design notes
------------
* **Optional and tiny.** The mount's ``metrics`` file already serves node_exporter's
  textfile collector (or ``cat``); this listener exists for setups that scrape the
  agent itself. It answers ``GET /metrics`` (and ``HEAD``) and nothing else: 404 for
  other paths, 405 for other methods, 400 for anything that is not an HTTP request.
* **Sans-IO core.** ``parse_request_head`` and ``response`` work on bytes and are
  unit-tested as such; ``serve`` is the thin trio adapter. One request per connection
  (``Connection: close``), a bounded head (8 KiB) and a deadline, so a slow or hostile
  client costs one small task for a few seconds and nothing else.
* **Bound before mounting.** ``bind`` runs before the agent touches the state dir, so a
  busy port is a one-line configuration error (exit 2) with nothing mounted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from ..config import ConfigError, parse_listen

__all__ = ["BadRequest", "parse_request_head", "response", "bind", "serve"]

log = logging.getLogger(__name__)

MAX_HEAD = 8192
REQUEST_DEADLINE = 10.0
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error"}


class BadRequest(Exception):
    pass


def parse_request_head(head: bytes) -> tuple[str, str]:
    """``(method, path)`` from the bytes up to the blank line; ``BadRequest`` otherwise."""
    line, _, _ = head.partition(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(f"not an HTTP/1.x request line: {line[:80]!r}")
    method, target = parts[0].decode("ascii", "replace"), parts[1].decode("ascii", "replace")
    if not method.isalpha() or not method.isupper() or not target:
        raise BadRequest(f"malformed request line: {line[:80]!r}")
    return method, target.split("?", 1)[0]


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
             *, head_only: bool = False, extra: dict[str, str] | None = None) -> bytes:
    headers = {"Content-Type": content_type, "Content-Length": str(len(body)),
               "Connection": "close", **(extra or {})}
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body)


def route(method: str, path: str, render: Callable[[], bytes], content_type: str) -> bytes:
    if path != "/metrics":
        return response(404, b"not found; metrics are at /metrics\n")
    if method not in ("GET", "HEAD"):
        return response(405, b"only GET and HEAD\n", extra={"Allow": "GET, HEAD"})
    return response(200, render(), content_type, head_only=method == "HEAD")


async def bind(listen: str) -> list[trio.SocketListener]:
    host, port = parse_listen(listen)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        raise ConfigError("metrics_listen", f"cannot listen on {listen}: "
                          f"{e.strerror or e}") from None


def bound_address(listeners: list[trio.SocketListener]) -> str:
    host, port = listeners[0].socket.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _handle(stream: trio.SocketStream, render: Callable[[], bytes],
                  content_type: str) -> None:
    async with stream:
        head = b""
        with trio.move_on_after(REQUEST_DEADLINE):
            while b"\r\n\r\n" not in head and len(head) <= MAX_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        try:
            if b"\r\n\r\n" not in head:
                raise BadRequest("incomplete, oversized or slow request head")
            method, path = parse_request_head(head)
            reply = route(method, path, render, content_type)
        except BadRequest as e:
            reply = response(400, f"{e}\n".encode())
        except Exception:
            # A broken collector is a bug to log, not a reason to take the agent down.
            log.exception("rendering metrics failed")
            reply = response(500, b"rendering metrics failed; see the agent's log\n")
        try:
            with trio.move_on_after(REQUEST_DEADLINE):
                await stream.send_all(reply)
        except trio.BrokenResourceError:
            pass  # the client went away; nothing to tell it


async def serve(listeners: list[trio.SocketListener], render: Callable[[], bytes],
                content_type: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    log.info("metrics at http://%s/metrics", bound_address(listeners))

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _handle(stream, render, content_type)
        except (trio.BrokenResourceError, OSError) as e:
            log.debug("metrics client: %s", e)

    await trio.serve_listeners(handler, listeners, task_status=task_status)
