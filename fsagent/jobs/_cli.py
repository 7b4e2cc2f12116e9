"""``fsagent jobs ...``: the job engine from a shell, over msgpack-RPC.

Design notes
------------
* Every subcommand is one ``Jobs.*`` RPC call, and every ``Jobs.*`` method is one
  engine verb: the CLI, the RPC API and the ``jobs/`` files share one code path per
  verb. The socket is found like ``fsagent call`` finds it (``--socket``, ``--config``,
  ``--state-dir``, else the defaults).
* Exit codes: 0 done; 2 bad input (an unknown job, an illegal move, a refused spec,
  malformed arguments) or no agent, as one line ``fsagent: NAME: message`` on stderr;
  ``wait`` exits 1 when the job ended in ``failure`` or ``cancelled``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..rpc import RpcError
from ..rpc.cli_support import add_socket_options, run_client

__all__ = ["add_jobs_commands"]

EXIT_BAD_INPUT = 2


def add_jobs_commands(sub) -> None:
    jobs = sub.add_parser("jobs", help="list, submit and control jobs of a running agent",
                          description="The job engine of a running agent (over its RPC "
                          "socket). Same verbs as the files under MOUNT/jobs/<id>/.")
    verbs = jobs.add_subparsers(dest="verb", required=True, metavar="VERB",
                                parser_class=type(jobs))

    p = verbs.add_parser("list", help="one line per job (or --json: the info records)")
    p.add_argument("--json", action="store_true", help="print jobs.json's records")
    p.set_defaults(func=cmd_list)

    p = verbs.add_parser("show", help="a job's info.json record")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_show)

    p = verbs.add_parser("submit", help="queue a job; prints its ID",
                         description="Queue a job of KIND. The spec is --spec JSON (an "
                         "object), plus --path (repeatable: the spec's \"paths\") and "
                         "--compression for archive and verify.")
    p.add_argument("kind", metavar="KIND", help="archive, verify or import")
    p.add_argument("--spec", metavar="JSON", default="{}", help="the kind's fields")
    p.add_argument("--path", metavar="PATH", action="append", dest="paths",
                   help="a path relative to uploads/ (repeatable)")
    p.add_argument("--compression", choices=("store", "deflate"))
    p.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    p.add_argument("--id", metavar="NAME", help="choose the job ID (default: generated)")
    p.set_defaults(func=cmd_submit)

    for verb in ("cancel", "pause", "resume", "retry"):
        p = verbs.add_parser(verb, help=f"{verb} a job; prints its new state")
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=cmd_control, rpc_verb=verb)

    p = verbs.add_parser("remove", help="delete a finished job with its log and outputs")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_remove)

    p = verbs.add_parser("wait", help="block until the job ends; print its final state "
                         "(exit 1 unless success)")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_wait)

    for parser in verbs.choices.values():
        add_socket_options(parser)


def _call(args: argparse.Namespace, method: str, *params, show) -> int:
    async def body(client):
        try:
            result = await client.call(method, *params)
        except RpcError as e:
            print(f"fsagent: {e.name}: {e.message}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return show(result)

    return run_client(args, body)


def _print_json(result) -> int:
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


def _print_line(result) -> int:
    print(result)
    return 0


def cmd_list(args) -> int:
    def show(records) -> int:
        if args.json:
            return _print_json(records)
        for r in records:
            print(f"{r['ID']}\t{r['State'].lower()}\t{r['Progress']}%\t{r['Type']}\t"
                  f"{r['Priority']}\t{r['Message']}")
        return 0

    return _call(args, "Jobs.list", show=show)


def cmd_show(args) -> int:
    return _call(args, "Jobs.show", args.id, show=_print_json)


def cmd_submit(args) -> int:
    try:
        spec = json.loads(args.spec)
    except ValueError as e:
        print(f"fsagent: error: --spec is not valid JSON: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not isinstance(spec, dict):
        print("fsagent: error: --spec must be a JSON object", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.paths:
        spec["paths"] = list(spec.get("paths", [])) + args.paths
    if args.compression:
        spec["compression"] = args.compression
    return _call(args, "Jobs.submit", args.kind, spec, args.priority, args.id,
                 show=_print_line)


def cmd_control(args) -> int:
    return _call(args, f"Jobs.{args.rpc_verb}", args.id, show=_print_line)


def cmd_remove(args) -> int:
    return _call(args, "Jobs.remove", args.id, show=lambda _: 0)


def cmd_wait(args) -> int:
    def show(state: str) -> int:
        print(state)
        return 0 if state == "success" else 1

    return _call(args, "Jobs.wait", args.id, show=show)
