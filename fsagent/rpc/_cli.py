"""``fsagent call``, ``fsagent watch`` and ``fsagent status``: the RPC API from a shell.

Design notes
------------
* All find the agent's socket with the same rules as ``fsagent run`` (``--socket``,
  else ``--config``'s ``socket``/``state_dir``, else the defaults), so a command run
  next to ``fsagent run`` needs no flags (``cli_support.py``, shared with
  ``fsagent jobs``).
* ``call`` parses each argument as JSON and, if it is not JSON, takes it as a plain
  string, so ``fsagent call FileServer.getSize /data/a.tif`` works unquoted. The
  result is printed as JSON; msgpack bin (``readBlock``) becomes
  ``{"base64": "..."}``.
* Exit codes: 0 success; 2 usage, configuration or connection problem (one line on
  stderr); 3 the agent answered with an error (one line ``NAME: message``);
  130 interrupted.
* ``status`` calls ``Agent.status`` (the same dict ``MOUNT/status`` shows) and prints
  a short summary, or the dict as JSON with ``--json``. It goes over RPC, not the
  mount, so it works for any user in the socket's group and tells "agent not running"
  (exit 2) apart from "mount wedged".
* ``watch`` creates a Persistent monitor, starts it, prints one JSON line per event
  (``{"monitorId", "fileId", "type"}``) and destroys it when interrupted.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from typing import Any

import trio

from ._errors import RpcError
from .cli_support import EXIT_ERROR_REPLY, add_socket_options, run_client

__all__ = ["add_rpc_commands", "EXIT_ERROR_REPLY"]


def add_rpc_commands(sub) -> None:
    call = sub.add_parser(
        "call", help="call one RPC method and print its result as JSON",
        description="Call METHOD with ARGS (each parsed as JSON, else taken as a string) "
        "and print the result as JSON. Exit 3 with `NAME: message` on an error reply.")
    add_socket_options(call)
    call.add_argument("method", metavar="METHOD", help="e.g. FileServer.getStats")
    call.add_argument("params", metavar="ARG", nargs="*", help="an argument (JSON or string)")
    call.set_defaults(func=cmd_call)

    status = sub.add_parser(
        "status", help="show the running agent's status (over RPC)",
        description="Print version, uptime, mount, store free space, uploads and jobs "
        "by state, monitors and RPC clients of the running agent; --json prints what "
        "MOUNT/status shows. Exit 2 with one line if the agent cannot be reached.")
    add_socket_options(status)
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(func=cmd_status)

    watch = sub.add_parser(
        "watch", help="watch a directory; print each event as a JSON line",
        description="Create a Persistent monitor on PATH (inside an exported root) and "
        "print each event as a JSON line until interrupted.")
    add_socket_options(watch)
    watch.add_argument("path", metavar="PATH")
    mode = watch.add_mutually_exclusive_group()
    mode.add_argument("--recurse", action="store_const", dest="mode", const="Recurse",
                      help="the whole tree, including directories created later")
    mode.add_argument("--follow", action="store_const", dest="mode", const="Follow",
                      help="like --recurse, and report files inside directories moved in")
    watch.add_argument("--whitelist", metavar="EXT", nargs="+", default=[],
                       help="extensions or globs of interest (tif, .tif, *.tif)")
    watch.add_argument("--blacklist", metavar="GLOB", nargs="+", default=[],
                       help="globs to ignore (not even watched)")
    watch.add_argument("--ignore-sys-files", action="store_true",
                       help="drop dotfiles, editor and partial files, .DS_Store, ...")
    watch.add_argument("--ignore-dir-events", action="store_true")
    watch.add_argument("--block-size", metavar="N", type=int, default=0,
                       help="events per notification (0 = no limit)")
    watch.set_defaults(func=cmd_watch, mode="Flat")


def _param(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(_jsonable(k)): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def cmd_call(args: argparse.Namespace) -> int:
    params = [_param(p) for p in args.params]

    async def body(client):
        result = await client.call(args.method, *params)
        print(json.dumps(_jsonable(result), sort_keys=True))
        return 0

    return run_client(args, body)


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    text = f"{hours:d}h{minutes:02d}m{s:02d}s"
    return f"{days}d{text}" if days else text


def _counts(by_state: dict) -> str:
    shown = [f"{n} {state}" for state, n in sorted(by_state.items()) if n]
    return ", ".join(shown) if shown else "none"


def _by_state(section: dict) -> dict[str, int]:
    """A component section's counts by state: its ``tasks``/``states``/``by_state``."""
    for key in ("tasks", "states", "by_state"):
        value = section.get(key)
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items() if isinstance(v, int)}
    return {}


def format_status(st: dict) -> str:
    """The human summary of an ``Agent.status`` dict."""
    lines = [f"fsagent {st.get('version')} (pid {st.get('pid')}), up "
             f"{_duration(st.get('uptime_seconds') or 0)}"
             + ("" if st.get("previous_run_clean", True) else
                ", recovered from an unclean stop"),
             f"mount:    {st.get('mount')} (state {st.get('state_dir')})",
             f"store:    {_bytes(st.get('store_free_bytes'))} free of "
             f"{_bytes(st.get('store_total_bytes'))}"]
    if isinstance(st.get("uploads"), dict):
        lines.append(f"uploads:  {_counts(_by_state(st['uploads']))}")
    if isinstance(st.get("jobs"), dict):
        lines.append(f"jobs:     {_counts(_by_state(st['jobs']))}")
    monitors = (st.get("monitors") or {}).get("monitors") or {}
    states: dict[str, int] = {}
    for m in monitors.values():
        states[m.get("state", "?")] = states.get(m.get("state", "?"), 0) + 1
    lines.append(f"monitors: {len(monitors)}" + (f" ({_counts(states)})" if monitors else ""))
    rpc = st.get("rpc") or {}
    clients = rpc.get("connections", 0)
    lines.append(f"rpc:      {clients} client{'' if clients == 1 else 's'} on "
                 f"{rpc.get('socket')}" + (f", TCP {', '.join(rpc['tcp'])}"
                                           if rpc.get("tcp") else ""))
    repo = st.get("repository") or {}
    if repo.get("backend") == "s3":
        lines.append(f"repository: s3 {repo.get('endpoint') or 'AWS'} bucket "
                     f"{repo.get('bucket')} prefix {repo.get('prefix')!r}; waiting "
                     f"{repo.get('waiting_files', 0)} files "
                     f"({_bytes(repo.get('waiting_bytes'))})"
                     + (f", {repo['failed_files']} in failed imports"
                        if repo.get("failed_files") else ""))
        cache = repo.get("cache") or {}
        if cache:
            lines.append(f"  cache: {cache.get('evicted_files', 0)} files evicted "
                         f"({_bytes(cache.get('evicted_bytes'))}), "
                         f"{_bytes(cache.get('local_bytes'))} local and evictable"
                         + (f", {cache['deletes_pending']} deletes pending"
                            if cache.get("deletes_pending") else ""))
    if st.get("metrics_listen"):
        lines.append(f"metrics:  http://{st['metrics_listen']}/metrics")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    async def body(client):
        result = await client.call("Agent.status")
        if args.json:
            print(json.dumps(_jsonable(result), indent=2, sort_keys=True))
        else:
            print(format_status(result))
        return 0

    return run_client(args, body)


def cmd_watch(args: argparse.Namespace) -> int:
    async def body(client):
        monitor_id = await client.call(
            "MonitorServer.createMonitor", "Persistent", ["All"], args.mode, args.path,
            args.whitelist, args.blacklist, 0.0, args.block_size, args.ignore_sys_files,
            args.ignore_dir_events, False, None)
        try:
            await client.call("MonitorServer.startMonitor", monitor_id)
            print(json.dumps({"monitorId": monitor_id, "watching": args.path}), flush=True)
            async for note in client.notifications:
                if note.method != "fsEventHappened" or len(note.params) != 2:
                    continue
                mid, events = note.params
                for event in events:
                    print(json.dumps({"monitorId": mid, **_jsonable(event)}), flush=True)
        finally:
            with trio.move_on_after(2) as scope:
                scope.shield = True
                try:
                    await client.call("MonitorServer.destroyMonitor", monitor_id)
                except (RpcError, trio.BrokenResourceError):
                    pass
        print("fsagent: error: the agent closed the connection", file=sys.stderr)
        return 2

    return run_client(args, body)
