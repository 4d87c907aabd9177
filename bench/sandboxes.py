"""Provider sandboxes for the benches, each in its own process (never inside a worker).

Child side: ``python -m bench.sandboxes KIND [--key-file F --key-id K]`` starts the sandbox,
prints one JSON line ``{"url"|"port", ...}`` on stdout, and on SIGTERM prints one more JSON line
with what it accepted: ``{"count": N, "stamps": {marker: accepted_at}}``. The recorder keeps a
count and, for messages carrying a marker (an OTP code), the ``time.time()`` of acceptance;
a blast of 200,000 messages would otherwise be held in memory by the sandbox.

Parent side: ``SandboxProcess(kind, ...)`` starts it and ``.stop()`` returns the final JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

# Lazy imports: a sandbox process loads only its own kind's sandbox (and its test extras: moto,
# aiosmtpd, h2), and the parent side, which every bench imports, none of them.

OTP_RE = re.compile(r"^(\d{6}) is your sign-in code")


class LightRecorder:
    """Drop-in for ``sandboxes.base.Recorder``: counts, and time-stamps OTPs. A SendGrid
    request's recipients are only counted (``add_batch`` never builds their rendered copies, which
    would be thrown away here; the sandbox still validates the whole request)."""

    def __init__(self) -> None:
        self.count = 0
        self.stamps: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, item: dict[str, Any]) -> None:
        now = time.time()
        body = item.get("body") or ""
        m = OTP_RE.match(body) if isinstance(body, str) else None
        with self._lock:
            self.count += 1
            if m:
                self.stamps.setdefault(m.group(1), now)

    def add_batch(self, n: int, build: Any) -> None:
        with self._lock:
            self.count += n

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"count": self.count, "stamps": dict(self.stamps)}]

    def clear(self) -> None:
        with self._lock:
            self.count = 0
            self.stamps.clear()

    def __len__(self) -> int:
        return self.count


def _child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["sendgrid", "twilio", "apns", "fcm", "smtp"])
    ap.add_argument("--key-file", type=Path)
    ap.add_argument("--key-id", default="")
    ap.add_argument("--team-id", default="")
    ap.add_argument("--topic", default="com.example.app")
    ap.add_argument(
        "--token-update-interval",
        type=float,
        default=0.0,
        help="APNs: refuse a new provider token this soon after the last (strict: 1200)",
    )
    a = ap.parse_args(argv)
    rec = LightRecorder()
    info: dict[str, Any]
    sb: Any
    if a.kind == "sendgrid":
        from sandboxes.sendgrid import DEFAULT_API_KEY, SendgridSandbox

        sb = SendgridSandbox(port=0)
        sb.recorder = rec
        sb.start()
        info = {"url": sb.url, "api_key": DEFAULT_API_KEY}
    elif a.kind == "twilio":
        from sandboxes.twilio import DEFAULT_ACCOUNT_SID, DEFAULT_AUTH_TOKEN, TwilioSandbox

        sb = TwilioSandbox(port=0)
        sb.recorder = rec
        sb.start()
        info = {"url": sb.url, "account_sid": DEFAULT_ACCOUNT_SID, "auth_token": DEFAULT_AUTH_TOKEN}
    elif a.kind == "apns":
        from sandboxes.apns import ApnsSandbox

        keys = {a.key_id: a.key_file.read_bytes()} if a.key_file else {}
        sb = ApnsSandbox(keys, topic=a.topic, team_id=a.team_id or None, token_update_interval=a.token_update_interval)
        sb.recorder = rec
        sb.start()
        info = {"url": sb.url, "ca_file": str(sb.ca_file)}
    elif a.kind == "fcm":
        from sandboxes.fcm import FcmSandbox

        sb = FcmSandbox(port=0)
        sb.recorder = rec
        sb.start()
        info = {"url": sb.url, "service_account": sb.service_account}
    else:
        from sandboxes.smtp import SmtpSandbox

        sb = SmtpSandbox(port=0)
        sb.recorder = rec
        sb.start()
        info = {"host": sb.host, "port": sb.port}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(json.dumps(info), flush=True)
    stop.wait()
    out = rec.all()[0]
    if a.kind == "apns":
        out["requests"] = len(sb.requests)
        out["tokens_seen"] = len(sb.tokens_seen)
        out["token_updates_refused"] = sb.token_updates_refused
    elif a.kind == "fcm":
        out["requests"] = sb.send_requests
        out["token_requests"] = sb.token_requests
    elif a.kind == "sendgrid":
        out["requests"] = len(sb.accepted_requests)
    print(json.dumps(out), flush=True)
    try:
        sb.stop()
    except Exception:  # noqa: BLE001 - the figures are out; stopping is best effort
        pass


class SandboxProcess:
    """A sandbox in a child process; ``info`` holds its address, ``stop()`` returns its counts."""

    def __init__(self, kind: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.sandboxes", kind, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"{kind} sandbox did not start: {err.strip()[-500:]}")
        self.info: dict[str, Any] = json.loads(line)

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is not None:
            self.proc.communicate()  # closes the pipes
            return {}
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, _err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            return {}
        lines = [ln for ln in out.splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else {}


if __name__ == "__main__":
    _child(sys.argv[1:])
