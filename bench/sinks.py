"""A C HTTP/2 + TLS sink for the push benches, so that the sink is never the bottleneck: nginx from
Debian's packages, started and stopped by the bench (``NginxSink``), and ``h2load`` (nghttp2's C
client) for the ceiling of the hardware on the same sink (``h2load``). See
``/work/shared/reference/ceilings.md`` for why: a ratio against our own Python sandbox measures the
sandbox, not the headroom.

The sink answers as APNs and FCM do when all is well and checks nothing:

- ``POST /3/device/<token>``: 200, empty body, the request's ``apns-id`` echoed (aioapns needs it);
- ``POST /v1/projects/<project>/messages:send``: 200 with a JSON ``name``;
- ``POST /token``: a canned OAuth2 access token (FCM's token endpoint).

Where nginx or h2load is missing, ``missing()`` says how to install them and the rows that need
them are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sandboxes.tls import make_certificates

INSTALL_HINT = "apt-get install -y nginx nghttp2-client"

_CONF = """worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  server {{
    listen 127.0.0.1:{port} ssl http2;
    ssl_certificate {dir}/cert.pem; ssl_certificate_key {dir}/key.pem;
    http2_max_concurrent_streams 1000;
    keepalive_requests 10000000;
    client_body_buffer_size 16k;
    location /3/device/ {{ add_header apns-id $http_apns_id; return 200; }}
    location /v1/projects/ {{
      default_type application/json;
      return 200 '{{"name":"projects/bench/messages/0:1"}}';
    }}
    location = /token {{
      default_type application/json;
      return 200 '{{"access_token":"ya29.bench-sink","expires_in":3600,"token_type":"Bearer"}}';
    }}
  }}
}}
"""


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def missing() -> str | None:
    """None when nginx and h2load are here, else what to install."""
    absent = [n for n in ("nginx", "h2load") if _binary(n) is None]
    return f"{' and '.join(absent)} not found: {INSTALL_HINT}" if absent else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NginxSink:
    """nginx in the foreground in a temp dir (its own certificate, made by a throwaway CA whose PEM is
    ``ca_file``). ``url`` is its base URL; ``pids`` its master and worker, for CPU accounting."""

    def __init__(self) -> None:
        binary = _binary("nginx")
        if binary is None:
            raise RuntimeError(f"nginx not found: {INSTALL_HINT}")
        self.dir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
        self.dir.chmod(0o755)
        ca, _cert, _key = make_certificates(self.dir)
        self.ca_file = str(ca)
        self.proc: subprocess.Popen[bytes] | None = None
        for _ in range(5):  # a port taken between our probe and nginx's bind: try another
            self.port = _free_port()
            conf = self.dir / "nginx.conf"
            conf.write_text(_CONF.format(dir=self.dir, port=self.port))
            self.proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(self.dir)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            if self._wait_listening():
                return
            self.stop()
        raise RuntimeError(f"nginx did not start: {(self.dir / 'error.log').read_text()[-500:]}")

    def _wait_listening(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def pids(self) -> dict[str, int]:
        import psutil

        if self.proc is None:
            return {}
        out = {"nginx master": self.proc.pid}
        for i, child in enumerate(psutil.Process(self.proc.pid).children()):
            out[f"nginx worker {i + 1}" if i else "nginx (C sink)"] = child.pid
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then the master exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NginxSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def h2load(url: str, n: int = 20000, clients: int = 2, streams: int = 100, body: bytes = b"{}") -> dict[str, Any]:
    """nghttp2's C client against ``url``: requests/s and CPU µs per request (user + system)."""
    binary = _binary("h2load")
    if binary is None:
        return {"error": f"h2load not found: {INSTALL_HINT}"}
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        t0 = os.times()
        res = subprocess.run([binary, "-n", str(n), "-c", str(clients), "-m", str(streams), "-d", f.name, url],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        t1 = os.times()
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", res.stdout)
    ok = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", res.stdout)
    if not m or not ok:
        return {"error": (res.stdout + res.stderr)[-300:]}
    cpu = (t1.children_user - t0.children_user) + (t1.children_system - t0.children_system)
    return {"requests_per_s": round(float(m.group(1)), 1), "succeeded": int(ok.group(1)),
            "cpu_us_per_request": round(cpu / max(1, n) * 1e6, 1)}  # fmt: skip
