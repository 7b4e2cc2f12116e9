"""Every setting fsagent has: its name, type, default, check and documentation.

Design notes
------------
* One flat table (``SETTINGS``) is the single source of truth. The TOML loader, the
  command-line overrides, the README's configuration reference and the error messages
  are all derived from it, so a setting cannot exist in one place and not another.
* Precedence, lowest first: the embedded defaults, the TOML file (``--config``),
  then command-line flags. An unknown key is an error, never silently ignored: a
  misspelt ``setle_seconds`` must not leave a lab running on the default.
* Relative paths in a TOML file are relative to that file's directory (so a config
  can travel with its state); relative paths from flags or defaults are relative to
  the working directory. Every path is made absolute once, here.
* Every failure is a ``ConfigError`` whose ``str()`` is one line naming the setting;
  the CLI prints it and exits 2 before anything is mounted.
* **Tables.** A setting named ``table.key`` is written in TOML as ``key`` inside a
  ``[table]`` (``[repository]`` ``backend = "s3"``) or as the dotted key
  ``table.key``; its ``Config`` attribute is ``table_key``. ``fsagent config`` prints
  dotted keys, which are valid TOML, so its output loads back.
* **Secrets are never settings.** The S3 repository's keys come from
  ``repository.credentials_file`` (AWS's shared-credentials INI) or the standard AWS
  environment variables; the config holds where they are, is checked for them at
  load (so a missing key is a one-line error, exit 2), and ``fsagent config`` and the
  logs never show a key.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Config", "ConfigError", "SETTINGS", "Setting", "load_config", "read_credentials"]


class ConfigError(Exception):
    """A setting is unknown, malformed or unusable. ``str()`` is a one-line message."""

    def __init__(self, setting: str, message: str):
        super().__init__(f"{setting}: {message}")
        self.setting = setting


# --- value parsers: each takes the raw TOML/flag value and the base dir for paths ------


def _path(value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a path string, got {value!r}")
    return (base / os.path.expanduser(value)).resolve()


def _optional_path(value: Any, base: Path) -> Path | None:
    if value is None or value == "":
        return None
    return _path(value, base)


def _path_list(value: Any, base: Path) -> tuple[Path, ...]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of paths, got {value!r}")
    return tuple(_path(v, base) for v in value)


def _int_at_least(minimum: int) -> Callable[[Any, Path], int]:
    def parse(value: Any, base: Path) -> int:
        # bool is an int subclass in Python; `true` is never a sensible byte count.
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                value = int(value)
            else:
                raise ValueError(f"expected an integer, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _optional_int_at_least(minimum: int) -> Callable[[Any, Path], int | None]:
    parse_int = _int_at_least(minimum)

    def parse(value: Any, base: Path) -> int | None:
        return None if value is None or value == "" else parse_int(value, base)

    return parse


def _number_at_least(minimum: float) -> Callable[[Any, Path], float]:
    def parse(value: Any, base: Path) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
        if not number >= minimum:  # also rejects NaN
            raise ValueError(f"must be at least {minimum:g}, got {value}")
        return number

    return parse


def _choice(*choices: str) -> Callable[[Any, Path], str]:
    def parse(value: Any, base: Path) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return parse


def _bool(value: Any, base: Path) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError(f"expected true or false, got {value!r}")


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` -> (host, port). ``ValueError`` if not."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT (port 0-65535), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _optional_listen(value: Any, base: Path) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    parse_listen(value)
    return value


def _argv(value: Any, base: Path) -> tuple[str, ...]:
    # An argv list, never a shell string: nothing a user uploads can become shell syntax.
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings (an argv), got {value!r}")
    return tuple(value)


def _optional_secret(value: Any, base: Path) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) < 16:
        raise ValueError("expected a string of at least 16 characters")
    return value


def _optional_group(value: Any, base: Path) -> str | None:
    """A local group, by name or number; checked now so a typo fails before mounting."""
    import grp
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"expected a group name, got {value!r}")
    try:
        if isinstance(value, int) or value.isdigit():
            grp.getgrgid(int(value))
        else:
            grp.getgrnam(value)
    except KeyError:
        raise ValueError(f"no such group {value!r} on this machine") from None
    return str(value)


def group_id(name: str) -> int:
    """The gid of a group ``_optional_group`` accepted."""
    import grp
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


def _optional_host_port(value: Any, base: Path) -> tuple[str, int] | None:
    if value is None or value == "":
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 0.0.0.0:8765), got {value!r}")
    return host.strip("[]"), int(port)


def _endpoint(value: Any, base: Path) -> str | None:
    from urllib.parse import urlsplit
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected a URL like http://127.0.0.1:8333, got {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    if parts.username or parts.password:
        raise ValueError("keys do not belong in the endpoint URL; use credentials_file "
                         "or the AWS environment variables")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise ValueError(f"bad port in {value!r}") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"expected scheme://host[:port] only, got {value!r}")
    return value.rstrip("/")


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket(value: Any, base: Path) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not _BUCKET.fullmatch(value) or ".." in value:
        raise ValueError(f"expected an S3 bucket name (3-63 of a-z 0-9 . -), got {value!r}")
    return value


def _prefix(value: Any, base: Path) -> str:
    """An object key prefix: ``a/b`` (no leading or trailing slash, no empty, ``.`` or
    ``..`` component). Default: the host name, so agents sharing a bucket stay apart."""
    if value is None:
        value = socket.gethostname()
    if not isinstance(value, str):
        raise ValueError(f"expected a key prefix like 'lab1/scope2', got {value!r}")
    stripped = value.strip("/")
    parts = stripped.split("/")
    if stripped and any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"empty, '.' or '..' components are refused, got {value!r}")
    if len(stripped.encode()) > 512 or any(ord(c) < 32 for c in stripped):
        raise ValueError(f"expected at most 512 bytes without control characters, got "
                         f"{value!r}")
    return stripped


def _region(value: Any, base: Path) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9-]{1,64}", value):
        raise ValueError(f"expected a region name like us-east-1, got {value!r}")
    return value


def _credentials_file(value: Any, base: Path) -> Path | None:
    path = _optional_path(value, base)
    if path is not None:
        read_credentials(path)  # a ValueError names what is wrong (never the keys)
    return path


def _ca_file(value: Any, base: Path) -> Path | None:
    path = _optional_path(value, base)
    if path is not None:
        import ssl
        try:
            ssl.create_default_context(cafile=str(path))
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or e
            raise ValueError(f"{path}: not a readable PEM file of CA certificates "
                             f"({reason})") from None
    return path


def read_credentials(path: Path | None) -> tuple[str, str, str | None]:
    """(access key, secret key, session token) from AWS's shared-credentials INI file
    (profile ``$AWS_PROFILE``, else ``default``), or without a file from
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (``AWS_SESSION_TOKEN``).
    ``ValueError`` says what is missing; it never contains a key."""
    import configparser
    if path is None:
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get(
            "AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise ValueError("backend s3 needs credentials: set credentials_file, or "
                             "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
                             "environment")
        return key, secret, os.environ.get("AWS_SESSION_TOKEN") or None
    profile = os.environ.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except (configparser.Error, UnicodeDecodeError):
        raise ValueError(f"{path} is not an AWS credentials file (INI)") from None
    if not parser.has_section(profile):
        raise ValueError(f"{path} has no [{profile}] profile")
    section = parser[profile]
    key, secret = section.get("aws_access_key_id"), section.get("aws_secret_access_key")
    if not key or not secret:
        raise ValueError(f"[{profile}] in {path} lacks aws_access_key_id or "
                         "aws_secret_access_key")
    return key.strip(), secret.strip(), (section.get("aws_session_token") or "").strip() or None


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any, Path], Any]
    default: Any  # raw value, parsed like user input (relative to the working dir)
    doc: str
    type_doc: str

    @property
    def attr(self) -> str:
        """The ``Config`` attribute: ``repository.backend`` -> ``repository_backend``."""
        return self.name.replace(".", "_")


LOG_LEVELS = ("debug", "info", "warning", "error")

SETTINGS: tuple[Setting, ...] = (
    Setting("mount", _path, "./mnt", "Where the FUSE filesystem is mounted. Created if missing; "
            "must be an empty directory (a stale mount left by a crash is cleared).", "path"),
    Setting("state_dir", _path, "./.fsagent", "Durable state: the SQLite database and the "
            "uploaded data. Must be on a local disk; `df` on the mount reports its space.", "path"),
    Setting("socket", _optional_path, None, "Unix socket of the msgpack-RPC API. "
            "Default: `STATE_DIR/rpc.sock`.", "path"),
    Setting("log_level", _choice(*LOG_LEVELS), "info", "Log verbosity on stderr: "
            + ", ".join(LOG_LEVELS) + ".", "string"),
    Setting("allow_other", _bool, False, "Let every local user use the mount (FUSE "
            "`allow_other` with `default_permissions`). Needs `user_allow_other` in "
            "/etc/fuse.conf for a non-root agent.", "bool"),
    Setting("shutdown_timeout", _number_at_least(0.5), 8.0, "Seconds a SIGTERM/SIGINT waits "
            "for in-flight FUSE requests before they are cancelled; the checkpoint and unmount "
            "follow.", "seconds"),
    Setting("db_flush_seconds", _number_at_least(0.01), 0.5, "How often batched bookkeeping "
            "(per-file counters, timestamps) is written to SQLite in one transaction.",
            "seconds"),
    Setting("worker_threads", _int_at_least(1), 4, "Worker threads for blocking work (disk "
            "I/O of real size, hashing, SQLite): the capacity limit that keeps the event loop "
            "free.", "integer"),
    Setting("settle_seconds", _number_at_least(0.1), 10.0, "An upload with no declared size, "
            "no client hash and no rsync rename is complete once it has stayed closed and "
            "unchanged this long.", "seconds"),
    Setting("checkpoint_bytes", _int_at_least(4096), 64 * 2**20, "An upload's data is synced "
            "and its durable offset recorded after this many new bytes (also every "
            "`checkpoint_seconds`, on fsync and on close).", "bytes"),
    Setting("checkpoint_seconds", _number_at_least(0.1), 5.0, "Longest time written upload "
            "data stays unsynced; after a crash, uploads resume from their last "
            "checkpoint.", "seconds"),
    Setting("store_reserve_bytes", _int_at_least(0), 64 * 2**20, "Free space kept back on "
            "the store for the database and checkpoints: writes and size declarations that "
            "would eat into it fail with ENOSPC.", "bytes"),
    Setting("recent_uploads", _int_at_least(0), 100, "How many completed uploads "
            "`uploads.json` lists after the unfinished ones.", "integer"),
    Setting("max_concurrent_jobs", _int_at_least(1), 2, "Jobs that run at the same time; "
            "the others wait in `pending`, highest priority first.", "integer"),
    Setting("job_history", _int_at_least(0), 1000, "Finished jobs (success, failure, "
            "cancelled) kept with their outputs; the oldest beyond this are removed.",
            "integer"),
    Setting("job_ttl", _number_at_least(1), 7 * 24 * 3600.0, "Seconds a finished job and its "
            "outputs are kept after it finished.", "seconds"),
    Setting("import_command", _argv, [], "Run by each import job after its files are "
            "recorded in the manifest: an argv list (no shell). With `{fileset}` (the path of "
            "the job's `fileset.json`) or `{root}` in it, it runs once per fileset; otherwise "
            "once per file, with `{path}`, `{sha256}` and `{task}` replaced. Its output goes "
            "to the job's log and exit status 0 means success. Empty: record only.", "argv"),
    Setting("import_grouping", _choice("directory", "manifest", "file"), "directory",
            "How verified uploads are grouped into filesets, one import job each: "
            "`directory` (uploads completed in one directory within "
            "`fileset_quiet_seconds` of each other), `manifest` (the files a checksum "
            "manifest lists, once all are verified) or `file` (one job per file).", "string"),
    Setting("fileset_quiet_seconds", _number_at_least(0), 1.0, "`directory` grouping: a "
            "directory's fileset is imported once no upload in it has completed for this "
            "long.", "seconds"),
    Setting("fileset_max_files", _int_at_least(1), 1000, "A fileset being collected is "
            "imported at once when it has this many files (the next ones start another).",
            "integer"),
    Setting("fileset_max_bytes", _int_at_least(1), 100 * 2**30, "A fileset being collected is "
            "imported at once when its files total this many bytes.",
            "bytes"),
    Setting("metrics_listen", _optional_listen, None, "Also serve `MOUNT/metrics` over "
            "HTTP at `http://HOST:PORT/metrics` (e.g. `127.0.0.1:9464`; port 0 picks a free "
            "one, shown in `status`). Unset: no listener.", "HOST:PORT"),
    # -- RPC, FileServer and monitors ----------------------------------------------------
    Setting("export_roots", _path_list, [], "Directories FileServer may read and monitors may "
            "watch (after resolving symlinks and `..`); anything else is an `OmeroFSError`. "
            "None by default. `fsagent run --export-root DIR` (repeatable) replaces the "
            "list.", "list of paths"),
    Setting("readblock_max_bytes", _int_at_least(1), 16 * 2**20, "Largest `size` a "
            "`FileServer.readBlock` call may ask for.", "bytes"),
    Setting("rpc_group", _optional_group, None, "Group of the RPC Unix socket (mode 0660): "
            "its members (and root) may use the RPC API, nobody else can connect. Unset: "
            "the agent's own group.", "group"),
    Setting("rpc_max_message_bytes", _int_at_least(1024), 32 * 2**20, "Largest msgpack-RPC "
            "message a client may send; a larger one closes that connection.", "bytes"),
    Setting("rpc_max_in_flight", _int_at_least(1), 64, "Requests served concurrently per "
            "connection; beyond that the agent stops reading from that client until one "
            "finishes.", "integer"),
    Setting("rpc_outbox_bytes", _int_at_least(65536), 16 * 2**20, "Replies and notifications "
            "queued for one client that is slow to read; when full, its requests and "
            "monitors wait.", "bytes"),
    Setting("rpc_tcp_listen", _optional_host_port, None, "Also serve RPC on TCP at "
            "`HOST:PORT` (port 0 picks one). Off by default; requires `rpc_token`.",
            "host:port"),
    Setting("rpc_token", _optional_secret, None, "Shared secret a TCP client must present "
            "first (`auth` method); at least 16 characters.", "string"),
    Setting("rpc_tls_cert", _optional_path, None, "PEM certificate chain: serve TCP over TLS "
            "(with `rpc_tls_key`).", "path"),
    Setting("rpc_tls_key", _optional_path, None, "PEM private key for `rpc_tls_cert`.",
            "path"),
    Setting("monitor_flush_ms", _int_at_least(1), 100, "A monitor sends its pending events at "
            "least this often, even when fewer than its `blockSize`.", "milliseconds"),
    Setting("monitor_grace_seconds", _number_at_least(0), 30.0, "Monitors of a client that "
            "disconnects are destroyed after this long.", "seconds"),
    Setting("monitor_max_pending_events", _int_at_least(100), 200000, "Events one monitor "
            "holds for a client that is slow to read; beyond that they are dropped and "
            "recovered like an inotify overflow (System `Overflow`, then a rescan).",
            "integer"),
    # -- the repository (fsagent/repository/): where verified uploads go --------------
    Setting("repository.backend", _choice("local", "s3"), "local", "Where an import "
            "puts a verified fileset: `local` (it stays in the state directory, recorded in "
            "the manifest) or `s3` (each file is also pushed to `bucket` as one object and "
            "verified there before the import succeeds; see \"Repository (S3)\").",
            "string"),
    Setting("repository.endpoint", _endpoint, None, "S3 endpoint URL, "
            "`http(s)://host[:port]` (MinIO, Ceph RGW, SeaweedFS, Garage ...). Unset: AWS's "
            "endpoint for `region`.", "URL"),
    Setting("repository.bucket", _bucket, None, "The bucket objects go to; it must "
            "exist (a missing bucket fails the import at once). Required with backend "
            "`s3`.", "string"),
    Setting("repository.prefix", _prefix, None, "Key prefix: a file `uploads/PATH` "
            "becomes the object `PREFIX/PATH`. Default: this machine's host name, so "
            "several agents share a bucket. Empty: keys are the paths themselves.",
            "string"),
    Setting("repository.region", _region, "us-east-1", "Region used to sign "
            "requests (most self-hosted stores accept any).", "string"),
    Setting("repository.path_style", _bool, True, "Path-style URLs "
            "(`endpoint/bucket/key`, what self-hosted stores expect); false: virtual-host "
            "style (`bucket.endpoint/key`).", "bool"),
    Setting("repository.credentials_file", _credentials_file, None, "AWS "
            "shared-credentials INI file (profile `$AWS_PROFILE`, else `default`: "
            "`aws_access_key_id`, `aws_secret_access_key`, optional `aws_session_token`). "
            "Unset: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` from the environment. Keys "
            "are never settings, flags or log lines.", "path"),
    Setting("repository.ca_file", _ca_file, None, "With an `https` endpoint: a PEM file "
            "of the CA certificates to trust for it (an on-site store signed by the lab's "
            "own CA), instead of the system's. Unset: the system's CAs (`SSL_CERT_FILE` "
            "and `AWS_CA_BUNDLE` apply).", "path"),
    Setting("repository.part_size", _int_at_least(5 * 2**20), 64 * 2**20, "Files up to "
            "this size are one PUT; larger ones are multipart uploads of parts this size "
            "(raised for files over 10,000 parts), resumed part by part after a restart. At "
            "least 5 MiB (S3's minimum).", "bytes"),
    Setting("repository.concurrency", _int_at_least(1), 4, "Requests (objects and parts) "
            "in flight to the store at once, over every import; each has its own worker "
            "thread, apart from `worker_threads`.", "integer"),
    Setting("repository.small_concurrency", _int_at_least(1), 8, "Requests for small "
            "objects (single PUTs of up to 1 MiB, HEADs, listings) in flight at once, apart "
            "from `concurrency`: they wait on the store's latency, not its bandwidth, so "
            "more of them keep it busy; each has its own worker thread.", "integer"),
    Setting("repository.cache_bytes", _optional_int_at_least(0), None, "With backend "
            "`s3`: the local copies of uploads verified in the store are a cache of at "
            "most this many bytes; beyond it the least recently used are evicted (the "
            "file stays in `uploads/`, read back from the store). Unset: no size limit "
            "(copies are still evicted when the store runs short).", "bytes"),
    Setting("repository.cache_free_floor_bytes", _int_at_least(0), 0, "With backend "
            "`s3`: verified copies are evicted (least recently used first) while the "
            "store's free space is below this. 0: only when a write would not fit.",
            "bytes"),
    Setting("repository.keep_deleted", _bool, False, "With backend `s3`: removing a "
            "pushed file from `uploads/` moves its object under `PREFIX/deleted/` "
            "instead of deleting it.", "bool"),
)

_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Config:
    """Resolved settings. Paths are absolute. Build it with ``load_config``."""

    mount: Path
    state_dir: Path
    socket: Path | None
    log_level: str
    allow_other: bool
    shutdown_timeout: float
    db_flush_seconds: float
    worker_threads: int
    settle_seconds: float
    checkpoint_bytes: int
    checkpoint_seconds: float
    store_reserve_bytes: int
    recent_uploads: int
    metrics_listen: str | None = None
    export_roots: tuple[Path, ...] = ()
    readblock_max_bytes: int = 16 * 2**20
    rpc_group: str | None = None
    rpc_max_message_bytes: int = 32 * 2**20
    rpc_max_in_flight: int = 64
    rpc_outbox_bytes: int = 16 * 2**20
    rpc_tcp_listen: tuple[str, int] | None = None
    rpc_token: str | None = None
    rpc_tls_cert: Path | None = None
    rpc_tls_key: Path | None = None
    monitor_flush_ms: int = 100
    monitor_grace_seconds: float = 30.0
    monitor_max_pending_events: int = 200000
    max_concurrent_jobs: int = 2
    job_history: int = 1000
    job_ttl: float = 7 * 24 * 3600.0
    import_command: tuple[str, ...] = ()
    import_grouping: str = "directory"
    fileset_quiet_seconds: float = 1.0
    fileset_max_files: int = 1000
    fileset_max_bytes: int = 100 * 2**30
    repository_backend: str = "local"
    repository_endpoint: str | None = None
    repository_bucket: str | None = None
    repository_prefix: str = ""
    repository_region: str = "us-east-1"
    repository_path_style: bool = True
    repository_credentials_file: Path | None = None
    repository_ca_file: Path | None = None
    repository_part_size: int = 64 * 2**20
    repository_concurrency: int = 4
    repository_small_concurrency: int = 8
    repository_cache_bytes: int | None = None
    repository_cache_free_floor_bytes: int = 0
    repository_keep_deleted: bool = False
    config_file: Path | None = None

    @property
    def socket_path(self) -> Path:
        return self.socket if self.socket is not None else self.state_dir / "rpc.sock"

    @property
    def database_path(self) -> Path:
        return self.state_dir / "fsagent.db"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def uploads_dir(self) -> Path:
        """Backing tree of ``MOUNT/uploads``: the same relative paths, on the state disk."""
        return self.data_dir / "uploads"

    @property
    def log_level_number(self) -> int:
        return getattr(logging, self.log_level.upper())


def load_config(
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    cwd: Path | None = None,
) -> Config:
    """Defaults, then the TOML file, then ``overrides`` (flags; ``None`` values ignored)."""
    cwd = Path(cwd or os.getcwd())
    raw: dict[str, tuple[Any, Path]] = {s.name: (s.default, cwd) for s in SETTINGS}
    file_path = None
    if config_file is not None:
        file_path = (cwd / config_file).resolve()
        try:
            with open(file_path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError("config", f"no such file: {file_path}") from None
        except OSError as e:
            raise ConfigError("config", f"cannot read {file_path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"{file_path} is not valid TOML: {e}") from None
        for key, value in _flatten(data):
            if key not in _BY_NAME:
                raise ConfigError(key, f"unknown setting in {file_path}")
            raw[key] = (value, file_path.parent)
    for key, value in (overrides or {}).items():
        if key not in _BY_NAME:
            raise ConfigError(key, "unknown setting")
        if value is not None:
            raw[key] = (value, cwd)
    values = {}
    for setting in SETTINGS:
        value, base = raw[setting.name]
        try:
            values[setting.attr] = setting.parse(value, base)
        except ValueError as e:
            raise ConfigError(setting.name, str(e)) from None
    config = Config(**values, config_file=file_path)
    _check_consistency(config)
    return config


_TABLES = {s.name.split(".")[0] for s in SETTINGS if "." in s.name}


def _flatten(data: dict) -> list[tuple[str, Any]]:
    """TOML keys as setting names: ``[repository] backend`` is ``repository.backend``."""
    out = []
    for key, value in data.items():
        if key in _TABLES:
            if not isinstance(value, dict):
                raise ConfigError(key, f"expected a table [{key}], got {value!r}")
            out.extend((f"{key}.{k}", v) for k, v in value.items())
        else:
            out.append((key, value))
    return out


def _check_consistency(config: Config) -> None:
    if config.repository_backend == "s3":
        if config.repository_bucket is None:
            raise ConfigError("repository.bucket", "backend s3 needs a bucket")
        try:
            read_credentials(config.repository_credentials_file)
        except ValueError as e:
            raise ConfigError("repository.credentials_file", str(e)) from None
    if config.rpc_tcp_listen is not None and config.rpc_token is None:
        raise ConfigError("rpc_tcp_listen", "TCP needs rpc_token (clients must authenticate)")
    if (config.rpc_tls_cert is None) != (config.rpc_tls_key is None):
        raise ConfigError("rpc_tls_cert", "rpc_tls_cert and rpc_tls_key go together")
    if config.rpc_tls_cert is not None and config.rpc_tcp_listen is None:
        raise ConfigError("rpc_tls_cert", "TLS is for TCP: set rpc_tcp_listen too")
    for root in config.export_roots:
        if not root.is_dir():
            raise ConfigError("export_roots", f"{root} is not a directory")
    mount, state = config.mount, config.state_dir
    if mount == state or mount in state.parents:
        raise ConfigError("state_dir", f"{state} is inside the mount point {mount}")
    if mount.is_relative_to(config.data_dir):
        raise ConfigError("mount", f"{mount} is inside the data directory {config.data_dir}")


def reference_markdown() -> str:
    """The configuration reference table, as the README shows it."""
    lines = ["| setting | type | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "—" if s.default is None else f"`{json.dumps(s.default)}`"
        lines.append(f"| `{s.name}` | {s.type_doc} | {default} | {s.doc} |")
    return "\n".join(lines)
