"""Helpers for the jobs tests: submit through the mount, write control files, wait."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from conftest import wait_for

# An import_command that blocks until `<file>.go` exists in uploads/ and fails if
# `<file>.fail` exists: lets a test hold a job in `running` for as long as it likes. Only
# the tests' own imports (task "t1") are gated; imports the uploads component submits for
# files written through the mount succeed at once.
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


def wait_until(predicate, timeout: float = 20.0, what: str = "condition"):
    return wait_for(predicate, timeout, what, interval=0.02)


def wait_status(job: Path, *states: str, timeout: float = 20.0) -> str:
    return wait_until(lambda: status(job) if status(job) in states else None, timeout,
                      what=f"{job.name} to be {'/'.join(states)}")


def open_gate(agent, rel: str) -> None:
    put(agent, rel + ".go", b"")
