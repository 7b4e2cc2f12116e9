"""Helpers for the jobs tests: submit through the mount, write control files, wait."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from conftest import PATIENCE, wait_for

# An import_command that blocks until `<file>.go` exists in uploads/ and fails if
# `<file>.fail` exists: lets a test hold a job in `running` for as long as it likes. Only
# the tests' own imports (task "t1") are gated; imports the uploads component submits for
# files written through the mount succeed at once. The shell creates `<file>.pid` before
# it writes the line into it: read it with `started_pid`, which waits for the whole line.
GATED_IMPORT = (
    'import_command = ["sh", "-c", '
    '"[ \\"$1\\" = t1 ] || exit 0; '
    'echo started $$ > \\"$0.pid\\"; while [ ! -e \\"$0.go\\" ]; do sleep 0.02; done; '
    '[ ! -e \\"$0.fail\\" ]", "{path}", "{task}"]\n'
)


def uploads_dir(agent) -> Path:
    d = agent.state / "data" / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    return d


def put(agent, rel: str, data: bytes = b"x") -> Path:
    path = uploads_dir(agent) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write(path: Path, data: bytes | str) -> None:
    """One write(2) with O_TRUNC, as `echo ... > path` does; raises OSError with errno."""
    if isinstance(data, str):
        data = data.encode()
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def submit(agent, name: str, spec: dict) -> Path:
    job = agent.jobs / name
    os.mkdir(job)
    write(job / "spec", json.dumps(spec) + "\n")
    return job


def import_spec(agent, rel: str, data: bytes = b"data", task: str = "t1") -> dict:
    path = put(agent, rel, data)
    return {"type": "import", "task": task, "path": rel, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "mtime_ns": path.stat().st_mtime_ns}


def control(job: Path, verb: str) -> None:
    write(job / "control", verb + "\n")


def read(path: Path) -> str:
    return path.read_text()


def status(job: Path) -> str:
    return read(job / "status").strip()


def info(job: Path) -> dict:
    return json.loads(read(job / "info.json"))


def wait_until(predicate, timeout: float = PATIENCE, what: str = "condition"):
    return wait_for(predicate, timeout, what, interval=0.02)


def wait_status(job: Path, *states: str, timeout: float = PATIENCE) -> str:
    """Wait until the job is in one of ``states``; returns the state it was seen in."""
    def reached():
        now = status(job)  # one read: the state checked is the state returned
        return now if now in states else None
    return wait_until(reached, timeout, what=f"{job.name} to be {'/'.join(states)}")


_STARTED_LINE = re.compile(r"started (\d+)\n")


def started_pid(agent, rel: str, *, other_than: int | None = None,
                timeout: float = PATIENCE) -> int:
    """The pid of the gated import_command running for ``rel``, from ``<rel>.pid``.

    Waits for the whole ``started PID`` line: the command's shell creates the file and
    writes the line in two steps, so the file can exist and be empty (or, in principle,
    hold part of the line). ``other_than`` skips a line left by an earlier run."""
    path = uploads_dir(agent) / f"{rel}.pid"

    def whole_line():
        try:
            m = _STARTED_LINE.fullmatch(path.read_text())
        except FileNotFoundError:
            return None
        return int(m.group(1)) if m and int(m.group(1)) != other_than else None

    return wait_until(whole_line, timeout, what=f"a whole 'started PID' line in {path.name}")


def open_gate(agent, rel: str) -> None:
    put(agent, rel + ".go", b"")
