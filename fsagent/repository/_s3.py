"""The S3 adapter: botocore behind the repository's ``ObjectStore`` contract.

Design notes
------------
* **Blocking, on purpose.** Every method is one (or a few) HTTP requests and blocks;
  the pusher calls them in worker threads under the repository's capacity limit,
  never on the event loop. botocore clients are thread-safe, so one client serves
  every thread (its connection pool is sized to the concurrency).
* **Our retries, not botocore's.** botocore's own retries are off
  (``total_max_attempts=1``): the pusher retries with its own backoff so that every
  attempt is visible (the job's message, ``fsagent_repository_retries_total``).
* **No surprise traffic.** Credentials are given explicitly (``config.read_credentials``:
  the shared-credentials file or the AWS environment variables), so botocore never
  walks its provider chain to the instance-metadata address. Its newer default of
  adding CRC checksums to every request is off (``when_required``): many S3-compatible
  stores reject them; we send the checksums we mean (Content-MD5 on every body,
  ``x-amz-checksum-sha256`` where the store verifies it).
* **Payload signing.** Over http botocore would SHA-256 every body a second time to
  sign it. Bodies carry a signed Content-MD5 the store checks (and a SHA-256 checksum
  where supported), so the payload is sent as ``UNSIGNED-PAYLOAD``: the headers are
  signed, the body is covered by its digest.
* **A lean path for small requests.** botocore spends about 1.2 ms of CPU on every
  request (parameter checks, serialisation, endpoint rules, event hooks, response
  parsing), and its SigV4 signer with the request's preparation alone ~0.2 ms (it
  derives the signing key with four HMACs per request and re-parses the URL; ours
  ~0.02 ms, measured on the 2-core VM): for a fileset of thousands of 4 KiB files
  that is most of the push. A PUT whose body is in memory, every HEAD, ranged GET and
  listing page go through ``_Lean``: AWS's published SigV4 algorithm over the headers
  (``_SigV4``, the derived key kept for its day) on keep-alive HTTP/1.1 connections of
  our own (``_Connections``: one ``sendall`` per request, the answer read through one
  buffered reader; urllib3 and http.client spent more CPU on a 4 KiB PUT than the
  rest of the agent's push, parsing headers with the email package among other
  things: 5,000 PUTs took 1.5 s less agent CPU without them), the answer read from
  its headers, a listing's XML parsed for key, size and ETag only. A refusal is
  turned into the same ``StoreError`` as botocore's (the S3 XML error's code and
  message). Multipart calls and streamed bodies keep the full client. With no
  ``endpoint`` (AWS's, which needs botocore's endpoint rules) everything uses the
  full client.
* **Errors** become ``StoreError(kind, transient, message)``: ``connection``,
  ``timeout``, ``server`` (5xx), ``throttled`` and ``digest`` (the body did not match
  its digest) are transient; ``credentials``, ``bucket``, ``permission``,
  ``certificate`` (an HTTPS certificate we do not trust) and ``request`` (any other
  refusal) are not. Messages name the endpoint and bucket,
  never a key.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import os
import re
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ElementTree
from typing import Any
from urllib.parse import quote, urlsplit

# botocore.session and botocore.config are imported by ``S3Store`` when it is made: the
# agent imports this module with any backend, and those two are ~7 MiB of its RSS.
import botocore.exceptions
import urllib3

from .. import longpaths

__all__ = ["S3Store", "StoreError", "RangeReader"]

_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                "InvalidToken", "InvalidSecurity", "TokenRefreshRequired",
                "AuthorizationHeaderMalformed"}
_PERMISSION = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden", "403"}
_BUCKET = {"NoSuchBucket"}
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
              "TooManyRequests", "ServiceUnavailable", "503"}
_TIMEOUT = {"RequestTimeout", "RequestTimeoutException"}
_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch",
           "XAmzContentChecksumMismatch"}


COPY_LIMIT = 5 * 2**30    # the largest object one CopyObject may copy (S3)
COPY_PART = 2**30         # a part of a server-side multipart copy
STREAM_PART = 64 * 2**20  # a part copied through the agent (held in memory once)


def _certificate_refused(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it: botocore and urllib3 wrap it) is a TLS
    certificate the store presented and we do not trust (or a name it does not cover)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, ssl.SSLCertVerificationError) or \
                "CERTIFICATE_VERIFY_FAILED" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class StoreError(Exception):
    """A request the store did not carry out. ``kind`` labels the metric; ``transient``
    says whether trying again may work."""

    def __init__(self, kind: str, transient: bool, message: str, code: str = ""):
        super().__init__(message)
        self.kind = kind
        self.transient = transient
        self.code = code


def _reason(exc: BaseException) -> str:
    """The innermost OS error's words (``connection refused``), else the exception's."""
    seen = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return (os.strerror(e.errno) or str(e)).lower()
        inner = getattr(e, "kwargs", {}).get("error") if hasattr(e, "kwargs") else None
        for nxt in (inner, e.__cause__, e.__context__, *getattr(e, "args", ())):
            if isinstance(nxt, BaseException):
                stack.append(nxt)
    text = str(exc)
    for word in ("Connection refused", "Connection reset", "timed out", "Broken pipe"):
        if word.lower() in text.lower():
            return word.lower()
    return text


class RangeReader:
    """A read-only, seekable file over ``length`` bytes of a file from ``offset``: the
    body of a PUT or a part, streamed from disk (no copy of the part in memory)."""

    def __init__(self, fd: int, offset: int, length: int):
        self._fd, self._start, self._len, self._pos = fd, offset, length, 0

    def __len__(self) -> int:
        return self._len

    def read(self, n: int = -1) -> bytes:
        left = self._len - self._pos
        if n is None or n < 0 or n > left:
            n = left
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._start + self._pos)
        if not data:
            raise OSError(errno.EIO, "the file is shorter than when the push began")
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


def open_for_reading(path: str) -> int:
    """A read-only descriptor of ``path`` (any length; ``longpaths``)."""
    with longpaths.at(path) as short:
        return os.open(short, os.O_RDONLY | os.O_CLOEXEC)


_XML_CODE = re.compile(r"<Code>([^<]*)</Code>")
_XML_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")


class _SigV4:
    """AWS Signature Version 4 of a request's headers, for S3 (AWS's published
    algorithm: canonical request, string to sign, a key derived per day). The body is
    never hashed (``UNSIGNED-PAYLOAD``, see the design notes); the derived key is kept
    for the day it is valid, so a request costs two SHA-256s and one HMAC."""

    def __init__(self, credentials: tuple[str, str, str | None], region: str):
        self.access, self._secret, self.token = credentials
        self.region = region
        self._day = ""
        self._key = b""

    def _signing_key(self, day: str) -> bytes:
        if day != self._day:
            key = ("AWS4" + self._secret).encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._day, self._key = day, key
        return self._key

    def sign(self, method: str, path: str, query: str, headers: dict[str, str]) -> None:
        """Add ``x-amz-date``, ``x-amz-content-sha256`` (and the session token) and
        ``Authorization`` to ``headers``, which must hold ``host``. ``path`` and
        ``query`` are as sent: URI-encoded, the query's pairs sorted (canonical)."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers["x-amz-date"] = stamp
        headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
        if self.token:
            headers["x-amz-security-token"] = self.token
        # Every header we send is signed except Content-Length (a proxy may rewrite
        # framing); values trimmed, inner runs of spaces folded, names lowercase.
        signed = sorted((name.lower(), " ".join(value.split()))
                        for name, value in headers.items() if name.lower() != "content-length")
        names = ";".join(name for name, _ in signed)
        canonical = "\n".join((method, path, query,
                               "".join(f"{name}:{value}\n" for name, value in signed),
                               names, "UNSIGNED-PAYLOAD"))
        scope = f"{stamp[:8]}/{self.region}/s3/aws4_request"
        to_sign = "\n".join(("AWS4-HMAC-SHA256", stamp, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()))
        signature = hmac.new(self._signing_key(stamp[:8]), to_sign.encode(),
                             hashlib.sha256).hexdigest()
        headers["Authorization"] = (f"AWS4-HMAC-SHA256 Credential={self.access}/{scope}, "
                                    f"SignedHeaders={names}, Signature={signature}")


def _uri(text: str, safe: str) -> str:
    """S3's URI encoding: everything but ``A-Za-z0-9-._~`` (and ``safe``) as %XX of UTF-8."""
    return quote(text, safe=safe)


class _Headers(dict):
    """An answer's headers, names lowercase; ``get`` takes any case."""

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)


@dataclasses.dataclass
class _Answer:
    status: int
    reason: str
    headers: _Headers
    data: bytes


class _Connections:
    """Keep-alive HTTP/1.1 connections to one host, and one request at a time on each.

    What S3 needs of HTTP and no more: a request written in one ``sendall``, its answer
    read through one buffered reader (status line, headers, a ``Content-Length`` or
    chunked body; none for HEAD, 1xx, 204, 304). A connection goes back to the idle
    list when its answer was read whole and neither side asked to close it. A request
    on a reused connection that finds it closed by the server (idle too long) before
    any byte of an answer is sent once more on a new one: the methods used (PUT, GET,
    HEAD) are idempotent. Errors are ``OSError``s: ``TimeoutError`` for a timeout,
    ``ConnectionError`` for the rest, with the system's words."""

    def __init__(self, scheme: str, netloc: str, maxsize: int, connect_timeout: float,
                 read_timeout: float, ca_file: str | None = None):
        parts = urlsplit(f"{scheme}://{netloc}")
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if scheme == "https" else 80)
        # ca_file: those CAs only, as botocore's ``verify=PATH``; else the system's.
        self.tls = ssl.create_default_context(cafile=ca_file) if scheme == "https" else None
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[tuple[socket.socket, Any]] = []
        self._lock = threading.Lock()

    def _connect(self) -> tuple[socket.socket, Any]:
        sock = socket.create_connection((self.host, self.port), self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
            return sock, sock.makefile("rb")
        except BaseException:
            sock.close()
            raise

    def request(self, method: str, target: str, headers: dict[str, str],
                body: bytes | None) -> _Answer:
        head = "".join([f"{method} {target} HTTP/1.1\r\n",
                        *(f"{k}: {v}\r\n" for k, v in headers.items()), "\r\n"])
        message = head.encode("latin-1") + (body or b"")
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
            sock, reader = conn
            try:
                try:
                    sock.sendall(message)
                except (ConnectionError, ssl.SSLEOFError):
                    if reused:
                        raise _Stale() from None
                    raise
                answer, keep = self._read(reader, method, may_be_stale=reused)
            except _Stale:
                _close(conn)
                continue  # the server closed it while idle: once more on a new one
            except BaseException:
                _close(conn)
                raise
            if keep:
                with self._lock:
                    if len(self._idle) < self.maxsize:
                        self._idle.append(conn)
                        conn = None
            if conn is not None:
                _close(conn)
            return answer

    def _read(self, reader, method: str, may_be_stale: bool) -> tuple[_Answer, bool]:
        while True:
            try:
                line = reader.readline(65537)
            except (ConnectionError, ssl.SSLEOFError):
                if may_be_stale:
                    raise _Stale() from None
                raise
            if not line:
                if may_be_stale:
                    raise _Stale()
                raise ConnectionError(errno.ECONNRESET, "the server closed the connection "
                                      "without an answer")
            may_be_stale = False  # an answer began: no sending again from here
            version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/") or not code.isdigit():
                raise ConnectionError(errno.EPROTO, f"not an HTTP answer: {line[:40]!r}")
            headers = _Headers()
            while True:
                field = reader.readline(65537)
                if field in (b"\r\n", b"\n"):
                    break
                if not field:
                    raise ConnectionError(errno.ECONNRESET, "the answer's headers were cut")
                name, _, value = field.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            status = int(code)
            if 100 <= status < 200:
                continue  # 100 Continue and the like: the real answer follows
            break
        keep = (version != "HTTP/1.0"
                and headers.get("connection", "").lower() != "close")
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = reader.readline(65537)
                if not size_line:
                    raise ConnectionError(errno.ECONNRESET, "a chunked answer was cut")
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    trailer = reader.readline(65537)
                    while trailer not in (b"\r\n", b"\n", b""):  # trailer fields: unused
                        trailer = reader.readline(65537)
                    break
                chunks.append(_read_exactly(reader, size))
                reader.readline(65537)  # the CRLF after the chunk
            data = b"".join(chunks)
        elif headers.get("content-length") is not None:
            data = _read_exactly(reader, int(headers["content-length"]))
        else:
            data = reader.read()  # the body runs to the end of the connection
            keep = False
        return _Answer(status, reason, headers, data), keep


class _Stale(Exception):
    """A reused connection the server had closed: nothing was answered on it."""


def _read_exactly(reader, size: int) -> bytes:
    data = reader.read(size)
    if len(data) != size:
        raise ConnectionError(errno.ECONNRESET, f"the answer's body was cut at {len(data)} "
                              f"of {size} bytes")
    return data


def _close(conn: tuple[socket.socket, Any]) -> None:
    sock, reader = conn
    with contextlib.suppress(OSError):
        reader.close()
    with contextlib.suppress(OSError):
        sock.close()


class _Lean:
    """Requests on one bucket without botocore's pipeline: our SigV4 (``_SigV4``) on
    our keep-alive HTTP/1.1 connections (``_Connections``)."""

    def __init__(self, endpoint: str, bucket: str, region: str, path_style: bool,
                 credentials: tuple[str, str, str | None], concurrency: int,
                 connect_timeout: float, read_timeout: float, ca_file: str | None = None):
        parts = urlsplit(endpoint)
        self.host = parts.netloc if path_style else f"{bucket}.{parts.netloc}"
        # The path of the bucket's root, as sent and as signed.
        self.root = f"/{_uri(bucket, '')}/" if path_style else "/"
        self.signer = _SigV4(credentials, region)
        self.connections = _Connections(parts.scheme, self.host, concurrency + 2,
                                        connect_timeout, read_timeout, ca_file)

    def request(self, method: str, key: str, headers: dict[str, str],
                body: bytes | None = None, query: dict[str, str] | None = None) -> _Answer:
        """One signed request on ``key`` ("" with ``query``: the bucket). Raises
        ``OSError`` (connection, timeout)."""
        path = self.root + _uri(key, "/~")
        canonical_query = "&".join(f"{_uri(k, '~')}={_uri(v, '~')}"
                                   for k, v in sorted((query or {}).items()))
        headers = {"host": self.host, **headers}
        if body is not None and "Content-Length" not in headers:
            headers["Content-Length"] = str(len(body))
        self.signer.sign(method, path, canonical_query, headers)
        target = f"{path}?{canonical_query}" if canonical_query else path
        return self.connections.request(method, target, headers, body)


def _client_error(response, operation: str) -> botocore.exceptions.ClientError:
    """A refusal as botocore would have raised it (code and message from the XML)."""
    text = response.data.decode("utf-8", "replace") if response.data else ""
    code = _XML_CODE.search(text)
    message = _XML_MESSAGE.search(text)
    return botocore.exceptions.ClientError(
        {"Error": {"Code": code.group(1) if code else str(response.status),
                   "Message": message.group(1) if message else response.reason or ""},
         "ResponseMetadata": {"HTTPStatusCode": response.status}}, operation)


class S3Store:
    """One bucket of one S3-compatible store. Every method blocks (worker threads)."""

    def __init__(self, *, endpoint: str | None, bucket: str, region: str, path_style: bool,
                 credentials: tuple[str, str, str | None], concurrency: int,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 ca_file: str | None = None):
        """``ca_file``: a PEM file of the only CAs trusted for an https endpoint (else
        the system's)."""
        self.endpoint = endpoint
        self.ca_file = ca_file
        self.bucket = bucket
        # Copies (keep_deleted): one CopyObject up to this, S3's limit; parts above it
        # (COPY_PART server-side, STREAM_PART through the agent). Attributes, so a test
        # can exercise the multipart copy with a small object.
        self.copy_limit, self.copy_part, self.stream_part = COPY_LIMIT, COPY_PART, STREAM_PART
        self.where = f"{endpoint or 'AWS ' + region} bucket {bucket!r}"
        key, secret, token = credentials
        import botocore.config  # not at module level: see the imports
        import botocore.session
        session = botocore.session.Session()
        # Nothing from ~/.aws/config may change what the settings say.
        session.set_config_variable("config_file", os.devnull)
        session.set_config_variable("credentials_file", os.devnull)
        config = botocore.config.Config(
            region_name=region,
            s3={"addressing_style": "path" if path_style else "virtual",
                "payload_signing_enabled": False},
            retries={"total_max_attempts": 1},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_pool_connections=max(10, concurrency + 2),
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="fsagent",
        )
        self._client = session.create_client(
            "s3", endpoint_url=endpoint, aws_access_key_id=key,
            aws_secret_access_key=secret, aws_session_token=token, config=config,
            verify=ca_file)  # None: botocore's default (the system's, AWS_CA_BUNDLE)
        self._lean = None if endpoint is None else _Lean(
            endpoint, bucket, region, path_style, credentials, concurrency,
            connect_timeout, read_timeout, ca_file)

    # -- errors -------------------------------------------------------------------------

    def _error(self, e: Exception, what: str) -> StoreError:
        if isinstance(e, botocore.exceptions.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code") or "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            text = f"{code}: {err.get('Message') or code}" if code else f"HTTP {status}"
            if code in _CREDENTIALS:
                return StoreError("credentials", False,
                                  f"{self.where} refused the credentials ({text}); check "
                                  "repository.credentials_file or AWS_ACCESS_KEY_ID/"
                                  "AWS_SECRET_ACCESS_KEY", code)
            if code in _BUCKET:
                return StoreError("bucket", False,
                                  f"{self.where}: the bucket does not exist ({text}); create "
                                  "it or fix repository.bucket", code)
            if code in _PERMISSION or status == 403:
                return StoreError("permission", False,
                                  f"{self.where}: access denied to {what} ({text}); the "
                                  "credentials may not write there", code)
            if code in _THROTTLED or status in (429, 503):
                return StoreError("throttled", True, f"{text} (the store is busy)", code)
            if code in _TIMEOUT or status == 408:
                return StoreError("timeout", True, text, code)
            if code in _DIGEST:
                return StoreError("digest", True, f"{text} (the body did not match its "
                                  "digest: changed while read, or damaged on the way)", code)
            if status >= 500:
                return StoreError("server", True, f"{text} (HTTP {status})", code)
            return StoreError("request", False, f"{self.where} refused {what} ({text}, "
                              f"HTTP {status})", code)
        if _certificate_refused(e):
            # Not a network hiccup: trying again cannot make the certificate trusted.
            return StoreError("certificate", False,
                              f"{self.where}: its TLS certificate is not trusted "
                              f"({_reason(e)}); " + (
                                  f"repository.ca_file ({self.ca_file}) does not hold its "
                                  "CA" if self.ca_file else
                                  "trust its CA (repository.ca_file, the system's store, "
                                  "or SSL_CERT_FILE and AWS_CA_BUNDLE)")
                              + " or fix repository.endpoint")
        if isinstance(e, (botocore.exceptions.ConnectTimeoutError,
                          botocore.exceptions.ReadTimeoutError)):
            return StoreError("timeout", True, _reason(e))
        if isinstance(e, (botocore.exceptions.HTTPClientError,
                          botocore.exceptions.EndpointConnectionError,
                          ConnectionError)):
            return StoreError("connection", True, _reason(e))
        if isinstance(e, botocore.exceptions.NoCredentialsError):
            return StoreError("credentials", False, str(e))
        if isinstance(e, (urllib3.exceptions.TimeoutError, TimeoutError)):
            return StoreError("timeout", True, _reason(e))
        if isinstance(e, OSError):
            return StoreError("connection", True, _reason(e))
        if isinstance(e, urllib3.exceptions.HTTPError):
            return StoreError("connection", True, _reason(e))
        raise e

    def _call(self, what: str, op: str, **kwargs: Any) -> dict:
        try:
            return getattr(self._client, op)(Bucket=self.bucket, **kwargs)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError,
                ConnectionError) as e:
            raise self._error(e, what) from None

    # -- the ObjectStore contract ---------------------------------------------------------

    def put_object(self, key: str, body, md5_b64: str, sha256_b64: str | None,
                   metadata: dict[str, str]) -> tuple[str, str | None]:
        """(the ETag, the ``x-amz-checksum-sha256`` the answer carries or None)."""
        if self._lean is not None and isinstance(body, bytes):
            headers = {"Content-MD5": md5_b64, "Content-Length": str(len(body))}
            if sha256_b64:
                headers["x-amz-checksum-sha256"] = sha256_b64
            headers.update((f"x-amz-meta-{k}", v) for k, v in metadata.items())
            try:
                r = self._lean.request("PUT", key, headers, body)
                if r.status // 100 != 2:
                    raise _client_error(r, "PutObject")
            except (botocore.exceptions.ClientError, OSError) as e:
                raise self._error(e, f"s3://{self.bucket}/{key}") from None
            return r.headers.get("ETag", ""), r.headers.get("x-amz-checksum-sha256")
        extra = {"ChecksumSHA256": sha256_b64} if sha256_b64 else {}
        r = self._call(f"s3://{self.bucket}/{key}", "put_object", Key=key, Body=body,
                       ContentLength=len(body), ContentMD5=md5_b64, Metadata=metadata,
                       **extra)
        return r.get("ETag", ""), r.get("ChecksumSHA256")

    def list_range(self, prefix: str, first: str, last: str,
                   max_pages: int) -> dict[str, tuple[int, str]]:
        """key -> (size, ETag) of the objects directly under ``prefix`` (``/`` is the
        delimiter: deeper keys are not listed) from ``first`` to ``last`` (both
        included), at most ``max_pages`` pages of 1,000: keys past them are missing
        from the answer, not an error (the caller asks for those one by one)."""
        # StartAfter is exclusive: the key just before ``first`` in S3's (UTF-8 byte)
        # order is not expressible, so start after ``first`` with its last character
        # one lower; keys listed before ``first`` are simply not ours.
        start_after = first[:-1] + chr(max(ord(first[-1]) - 1, 0)) if first else ""
        listed: dict[str, tuple[int, str]] = {}
        query = {"list-type": "2", "prefix": prefix, "delimiter": "/",
                 "start-after": start_after}
        for _ in range(max_pages):
            entries, token = self._list_page(prefix, query)
            for key, size, etag in entries:
                if first <= key <= last:
                    listed[key] = (size, etag)
            if token is None or (entries and entries[-1][0] >= last):
                break
            query = {"list-type": "2", "prefix": prefix, "delimiter": "/",
                     "continuation-token": token}
        return listed

    def _list_page(self, prefix: str, query: dict[str, str]) -> tuple[list, str | None]:
        """One ListObjectsV2 page: ([(key, size, ETag)], the continuation token or None)."""
        what = f"s3://{self.bucket}/{prefix}"
        if self._lean is None:
            kwargs = {"Prefix": query["prefix"], "Delimiter": query["delimiter"]}
            if "start-after" in query:
                kwargs["StartAfter"] = query["start-after"]
            if "continuation-token" in query:
                kwargs["ContinuationToken"] = query["continuation-token"]
            r = self._call(what, "list_objects_v2", **kwargs)
            entries = [(o["Key"], int(o["Size"]), o.get("ETag", ""))
                       for o in r.get("Contents", [])]
            token = r.get("NextContinuationToken") if r.get("IsTruncated") else None
            return entries, token or None
        try:
            r = self._lean.request("GET", "", {}, query=query)
            if r.status // 100 != 2:
                raise _client_error(r, "ListObjectsV2")
        except (botocore.exceptions.ClientError, OSError) as e:
            raise self._error(e, what) from None
        # The answer's XML, read for what the check needs (no timestamps, no owners).
        try:
            root = ElementTree.fromstring(r.data)
        except ElementTree.ParseError:
            # A key with a character XML 1.0 cannot carry: nothing listed, so every
            # key of the range is checked by its own HEAD instead.
            return [], None
        entries, truncated, token = [], False, None
        for child in root:
            tag = child.tag.rpartition("}")[2]
            if tag == "Contents":
                fields = {c.tag.rpartition("}")[2]: c.text or "" for c in child}
                entries.append((fields.get("Key", ""), int(fields.get("Size") or -1),
                                fields.get("ETag", "")))
            elif tag == "IsTruncated":
                truncated = (child.text or "").strip() == "true"
            elif tag == "NextContinuationToken":
                token = child.text
        return entries, (token or None) if truncated else None

    def head_object(self, key: str) -> dict | None:
        """``{size, etag, checksum_sha256, metadata}``, or None if there is no object."""
        if self._lean is not None:
            try:
                r = self._lean.request("HEAD", key, {"x-amz-checksum-mode": "ENABLED"})
                if r.status == 404:
                    return None
                if r.status // 100 != 2:
                    raise _client_error(r, "HeadObject")
            except (botocore.exceptions.ClientError, OSError) as e:
                raise self._error(e, f"s3://{self.bucket}/{key}") from None
            h = r.headers
            return {"size": int(h.get("Content-Length", -1)), "etag": h.get("ETag", ""),
                    "checksum_sha256": h.get("x-amz-checksum-sha256"),
                    "metadata": {k[11:]: v for k, v in h.items()
                                 if k.lower().startswith("x-amz-meta-")}}
        try:
            r = self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except botocore.exceptions.ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404 or e.response.get("Error", {}).get("Code") in ("NoSuchKey",
                                                                             "NotFound"):
                return None
            raise self._error(e, f"s3://{self.bucket}/{key}") from None
        except (botocore.exceptions.BotoCoreError, ConnectionError) as e:
            raise self._error(e, f"s3://{self.bucket}/{key}") from None
        return {"size": r.get("ContentLength"), "etag": r.get("ETag", ""),
                "checksum_sha256": r.get("ChecksumSHA256"),
                "metadata": r.get("Metadata") or {}}

    def bucket_missing(self) -> bool:
        """Whether the bucket does not exist (HEAD bucket answers 404): some stores
        answer a write into a missing bucket with AccessDenied."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError as e:
            return e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404
        except (botocore.exceptions.BotoCoreError, ConnectionError):
            return False
        return False

    def delete_object(self, key: str) -> None:
        self._call(f"s3://{self.bucket}/{key}", "delete_object", Key=key)

    def create_multipart(self, key: str, metadata: dict[str, str], checksums: bool) -> str:
        extra = {"ChecksumAlgorithm": "SHA256"} if checksums else {}
        r = self._call(f"s3://{self.bucket}/{key}", "create_multipart_upload", Key=key,
                       Metadata=metadata, **extra)
        return r["UploadId"]

    def upload_part(self, key: str, upload_id: str, number: int, body, md5_b64: str,
                    sha256_b64: str | None) -> str:
        extra = {"ChecksumSHA256": sha256_b64} if sha256_b64 else {}
        r = self._call(f"part {number} of s3://{self.bucket}/{key}", "upload_part", Key=key,
                       UploadId=upload_id, PartNumber=number, Body=body,
                       ContentLength=len(body), ContentMD5=md5_b64, **extra)
        return r.get("ETag", "")

    def list_parts(self, key: str, upload_id: str) -> dict[int, tuple[int, str]] | None:
        """number -> (size, ETag) of the parts the server holds; None if the upload is
        gone (completed, aborted, or forgotten by a store that keeps them in memory)."""
        parts: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            try:
                r = self._client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id,
                                            PartNumberMarker=marker)
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") == "NoSuchUpload" or \
                        e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                    return None
                raise self._error(e, f"s3://{self.bucket}/{key}") from None
            except (botocore.exceptions.BotoCoreError, ConnectionError) as e:
                raise self._error(e, f"s3://{self.bucket}/{key}") from None
            for p in r.get("Parts", []):
                parts[int(p["PartNumber"])] = (int(p["Size"]), p.get("ETag", ""))
            if not r.get("IsTruncated"):
                return parts
            nxt = int(r.get("NextPartNumberMarker") or 0)
            if nxt <= marker:
                return parts
            marker = nxt

    def complete_multipart(self, key: str, upload_id: str,
                           parts: list[tuple[int, str, str | None]]) -> str:
        listing = []
        for number, etag, sha in parts:
            entry = {"PartNumber": number, "ETag": etag}
            if sha:
                entry["ChecksumSHA256"] = sha
            listing.append(entry)
        r = self._call(f"s3://{self.bucket}/{key}", "complete_multipart_upload", Key=key,
                       UploadId=upload_id, MultipartUpload={"Parts": listing})
        return r.get("ETag", "")

    def get_range(self, key: str, offset: int, length: int) -> tuple[bytes, int, dict]:
        """``length`` bytes of the object from ``offset`` (fewer at its end): (the bytes,
        the object's whole size, its user metadata). A missing object is a ``request``
        error (``NoSuchKey``)."""
        last = offset + max(length, 1) - 1
        if self._lean is not None:
            try:
                r = self._lean.request("GET", key, {"Range": f"bytes={offset}-{last}"})
                if r.status // 100 != 2:
                    raise _client_error(r, "GetObject")
            except (botocore.exceptions.ClientError, OSError) as e:
                raise self._error(e, f"s3://{self.bucket}/{key}") from None
            h = r.headers
            metadata = {k[11:].lower(): v for k, v in h.items()
                        if k.lower().startswith("x-amz-meta-")}
            body = r.data
        else:
            resp = self._call(f"s3://{self.bucket}/{key}", "get_object", Key=key,
                              Range=f"bytes={offset}-{last}")
            h = {"Content-Range": resp.get("ContentRange", ""),
                 "Content-Length": str(resp.get("ContentLength", ""))}
            metadata = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
            try:
                body = resp["Body"].read()
            except (botocore.exceptions.BotoCoreError, ConnectionError,
                    urllib3.exceptions.HTTPError) as e:
                raise self._error(e, f"s3://{self.bucket}/{key}") from None
        total = h.get("Content-Range", "").rpartition("/")[2]
        size = int(total) if total.isdigit() else int(h.get("Content-Length") or len(body))
        return body[:length], size, metadata

    def copy_object(self, source: str, key: str, size: int | None = None,
                    metadata: dict[str, str] | None = None) -> None:
        """Server-side copy of ``source`` (``size`` bytes, user ``metadata``) to ``key``,
        user metadata kept. One CopyObject up to ``copy_limit`` (5 GiB, S3's limit for
        it); above, a multipart copy (UploadPartCopy, ``COPY_PART`` each) or, where the
        store cannot copy parts (``rclone serve s3`` answers without an ETag), each
        part read with a ranged GET and sent again. The copy's size is checked."""
        if size is None or size <= self.copy_limit:
            self._call(f"s3://{self.bucket}/{key}", "copy_object", Key=key,
                       CopySource={"Bucket": self.bucket, "Key": source},
                       MetadataDirective="COPY")
            return
        for server_side in (True, False):
            # S3 keeps user metadata keys in lower case; some stores answer them
            # capitalised, and would store them so.
            upload_id = self.create_multipart(
                key, {k.lower(): v for k, v in (metadata or {}).items()}, checksums=False)
            try:
                parts = self._copy_parts(source, key, upload_id, size, server_side)
                if parts is None:
                    self.abort_multipart(key, upload_id)
                    continue  # this store cannot copy parts: send them
                self.complete_multipart(key, upload_id, parts)
            except BaseException:
                # The first error is the one to report; an upload left behind expires.
                with contextlib.suppress(StoreError):
                    self.abort_multipart(key, upload_id)
                raise
            break
        head = self.head_object(key)
        if head is None or head["size"] != size:
            raise StoreError("request", False, f"the copy of an object in {self.where} "
                             f"has {None if head is None else head['size']} bytes, not {size}")

    def _copy_parts(self, source: str, key: str, upload_id: str, size: int,
                    server_side: bool) -> list[tuple[int, str, None]] | None:
        """The parts of a multipart copy, sent; None if the store copied a part without
        answering its ETag (it cannot copy parts)."""
        part = self.copy_part if server_side else self.stream_part
        parts = []
        for number, offset in enumerate(range(0, size, part), start=1):
            last = min(size, offset + part) - 1
            if server_side:
                r = self._call(f"part {number} of s3://{self.bucket}/{key}",
                               "upload_part_copy", Key=key, UploadId=upload_id,
                               PartNumber=number,
                               CopySource={"Bucket": self.bucket, "Key": source},
                               CopySourceRange=f"bytes={offset}-{last}")
                etag = (r.get("CopyPartResult") or {}).get("ETag")
                if not etag:
                    return None
            else:
                body, _, _ = self.get_range(source, offset, last + 1 - offset)
                if len(body) != last + 1 - offset:
                    raise StoreError("request", False, f"an object in {self.where} "
                                     "changed while it was copied")
                md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
                etag = self.upload_part(key, upload_id, number, body, md5, None)
            parts.append((number, etag, None))
        return parts

    def unfinished_uploads(self, key: str) -> list[str]:
        """The IDs of the multipart uploads of ``key`` the store holds unfinished."""
        ids: list[str] = []
        marker: dict[str, str] = {}
        while True:
            r = self._call(f"s3://{self.bucket}/{key}", "list_multipart_uploads",
                           Prefix=key, **marker)
            ids += [u["UploadId"] for u in r.get("Uploads", []) if u.get("Key") == key]
            if not r.get("IsTruncated") or not r.get("NextUploadIdMarker"):
                return ids
            marker = {"KeyMarker": r.get("NextKeyMarker", ""),
                      "UploadIdMarker": r["NextUploadIdMarker"]}

    def abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            self._call(f"s3://{self.bucket}/{key}", "abort_multipart_upload", Key=key,
                       UploadId=upload_id)
        except StoreError as e:
            if e.code != "NoSuchUpload":
                raise
