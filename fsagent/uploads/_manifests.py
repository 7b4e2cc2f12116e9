"""Checksum manifests: what ``md5sum``/``sha1sum``/``sha256sum`` write, read back.

Design notes
------------
* **Which files.** In a directory, ``MD5SUMS``, ``SHA1SUMS`` and ``SHA256SUMS`` declare
  hashes for the files they name (relative to that directory); ``NAME.md5``,
  ``NAME.sha1`` and ``NAME.sha256`` declare the hash of ``NAME`` next to them (their
  lines may name ``NAME`` or a path ending in it, or hold just the hex digest).
* **Format.** GNU coreutils' output: ``HEX  NAME`` (text mode) or ``HEX *NAME``
  (binary mode); a leading backslash means the name is escaped (``\\\\`` and ``\\n``).
  The BSD tag form ``SHA256 (NAME) = HEX`` (``--tag``) is accepted too. Lines that do
  not parse, and digests of the wrong length, are ignored: a manifest may list files
  that are not uploads, and a broken line must not block the others.
* **Pure.** Parsing takes bytes and returns a mapping; reading the files (in a worker
  thread) and applying the declarations is the component's job.
"""

from __future__ import annotations

import re

__all__ = ["ALGORITHMS", "DIGEST_HEX_LENGTH", "manifest_kind", "parse_manifest",
           "manifest_names_for"]

ALGORITHMS = ("md5", "sha1", "sha256")
DIGEST_HEX_LENGTH = {"md5": 32, "sha1": 40, "sha256": 64}
_LIST_NAMES = {b"MD5SUMS": "md5", b"SHA1SUMS": "sha1", b"SHA256SUMS": "sha256"}
_SUFFIXES = {b".md5": "md5", b".sha1": "sha1", b".sha256": "sha256"}
_TAGS = {b"MD5": "md5", b"SHA1": "sha1", b"SHA256": "sha256"}
_HEX = re.compile(rb"^[0-9a-fA-F]+$")
_GNU_LINE = re.compile(rb"^(\\?)([0-9a-fA-F]+) [ *](.+)$", re.S)
_BSD_LINE = re.compile(rb"^(\\?)(MD5|SHA1|SHA256) \((.+)\) = ([0-9a-fA-F]+)$", re.S)


def manifest_kind(name: bytes) -> tuple[str, bytes | None] | None:
    """``(algorithm, subject)`` if ``name`` is a manifest; subject None for a list file."""
    if name in _LIST_NAMES:
        return _LIST_NAMES[name], None
    for suffix, algorithm in _SUFFIXES.items():
        if name.endswith(suffix) and len(name) > len(suffix):
            return algorithm, name[: -len(suffix)]
    return None


def manifest_names_for(name: bytes) -> list[tuple[bytes, str]]:
    """The manifest file names in the same directory that may declare ``name``'s hash."""
    out = [(list_name, algorithm) for list_name, algorithm in _LIST_NAMES.items()]
    out += [(name + suffix, algorithm) for suffix, algorithm in _SUFFIXES.items()]
    return out


def _unescape(name: bytes) -> bytes:
    out, i = bytearray(), 0
    while i < len(name):
        if name[i : i + 1] == b"\\" and i + 1 < len(name):
            nxt = name[i + 1 : i + 2]
            out += b"\n" if nxt == b"n" else nxt
            i += 2
        else:
            out += name[i : i + 1]
            i += 1
    return bytes(out)


def _normalise(name: bytes) -> bytes:
    while name.startswith(b"./"):
        name = name[2:]
    return name


def parse_manifest(content: bytes, algorithm: str, subject: bytes | None = None
                   ) -> dict[bytes, str]:
    """Map each file name the manifest declares to its lowercase hex digest.

    For a per-file manifest (``subject`` given) the only key is ``subject``: a bare
    digest, or a line whose name is the subject (or ends in ``/subject``).
    """
    want = DIGEST_HEX_LENGTH[algorithm]
    found: dict[bytes, str] = {}
    for raw in content.splitlines():
        line = raw.rstrip(b"\r")
        if not line.strip():
            continue
        if subject is not None and _HEX.match(line.strip()) and len(line.strip()) == want:
            found[subject] = line.strip().decode().lower()
            continue
        m = _GNU_LINE.match(line)
        if m:
            escaped, digest, name = m.group(1), m.group(2), m.group(3)
        else:
            m = _BSD_LINE.match(line)
            if not m or _TAGS[m.group(2)] != algorithm:
                continue
            escaped, name, digest = m.group(1), m.group(3), m.group(4)
        if len(digest) != want:
            continue
        if escaped:
            name = _unescape(name)
        name = _normalise(name)
        if subject is not None:
            if name == subject or name.endswith(b"/" + subject):
                found[subject] = digest.decode().lower()
            continue
        found[name] = digest.decode().lower()
    return found
