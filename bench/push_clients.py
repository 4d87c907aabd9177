"""HTTP/2 push clients side by side, against one C sink (nginx, ``bench.sinks``), in one run.

Each candidate sends ``n`` APNs-shaped pushes (the same headers and payload as
``worker.providers.apns`` sends) in batches of ``batch`` concurrent requests over 2 connections,
in its own process (``python -m bench.push_clients CANDIDATE ...`` prints one JSON line), so
that its CPU time (user + system, every thread: libcurl's, tokio's) is its own. The parent
runs the candidates in turn, ``rounds`` times (alternating, so that a machine busy with
something else slows them all alike), and reports each one's median.

Candidates (issue 20):

- ``apns``, ``fcm``: our providers (``Provider.send`` on pre-built batches, libcurl via pycurl);
- ``h2``: an asyncio client on h2, as the providers were before (one coroutine per request);
  ``h2-novalid``: the same with header validation and normalisation off;
- ``jh2``: the same on jh2 (h2's API, HPACK in Rust), validation off; ``jh2-uvloop``: on uvloop;
- ``pyreqwest``, ``pyreqwest-uvloop``: the Rust reqwest/hyper client, one coroutine per request;
- ``aioapns``: aioapns 4 (PyPI), 2 connections, ``batch`` concurrent ``send_notification``.

Optional ones (jh2, uvloop, pyreqwest, aioapns: the ``bench`` extra) that are not installed
answer ``{"error": ...}`` and are left out of the table.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

# Lazy imports: each candidate runs in a process of its own whose CPU is measured, and loads only
# its own client (ours: the provider and its settings; the others: their libraries alone).

TOPIC = "com.example.app"
BODY = (b'{"aps":{"alert":{"title":"10% off this week","body":"Hi F, use WEEK10 for 10% off."},'
        b'"sound":"default"},"notification_id":"n_bare0000001","type":"weekly_promo"}')  # fmt: skip
CANDIDATES = ("apns", "fcm", "h2", "h2-novalid", "jh2", "jh2-uvloop", "pyreqwest", "pyreqwest-uvloop", "aioapns")


def _token(i: int) -> str:
    return f"{i:064x}"


def _jwt() -> tuple[str, Any]:
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode({"iss": "BENCHTEAM1", "iat": int(time.time())}, key, algorithm="ES256",
                      headers={"kid": "BENCHKEY01"}), key  # fmt: skip


def _apns_headers(i: int, jwt_token: str) -> list[tuple[str, str]]:
    return [("authorization", f"bearer {jwt_token}"), ("apns-topic", TOPIC), ("apns-push-type", "alert"),
            ("apns-priority", "5"), ("apns-expiration", str(int(time.time()) + 86400)),
            ("apns-id", str(uuid.uuid4()).upper()), ("content-type", "application/json"),
            ("apns-collapse-id", f"campaign:c_bare:u{i:07d}")]  # fmt: skip


# -- our providers ------------------------------------------------------------------------------


def bare_messages(route: str, n: int, tag: str = "bare") -> list[Any]:
    """``n`` pushes of a weekly promo for ``route`` (``push.ios`` or ``push.android``), built as the
    pipeline builds them, for the bare provider loops."""
    from bench.harness import android_token, ios_token
    from worker.providers import Message

    token = ios_token if route == "push.ios" else android_token
    t = {"title": "10% off this week", "body": "Hi F, use WEEK10 for 10% off."}
    return [
        Message(delivery_id=f"d_{tag}{i:07d}", notification_id=f"n_{tag}{i:07d}", channel="push", route=route,
                address=token(i), content=dict(t), category="marketing", priority="low",
                dedup_key=f"campaign:c_{tag}:u{i:07d}",
                data={"notification_id": f"n_{tag}{i:07d}", "type": "weekly_promo"}, user_id=f"u{i:07d}")
        for i in range(n)
    ]  # fmt: skip


def run_provider(kind: str, url: str, ca: str, n: int, batch: int) -> tuple[int, float, float]:
    from pathlib import Path
    from tempfile import mkdtemp

    from notifyctl.settings import load_settings

    home = Path(mkdtemp(prefix="bench-client-"))
    if kind == "apns":
        from cryptography.hazmat.primitives import serialization

        from worker.providers.apns import Provider

        _, key = _jwt()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()  # fmt: skip
        opts = {"key": pem, "key_id": "BENCHKEY01", "team_id": "BENCHTEAM1", "topic": TOPIC, "base_url": url,
                "ca_file": ca}  # fmt: skip
        provider: Any = Provider(load_settings(home=home, provider_options={"apns": opts}))
        msgs = bare_messages("push.ios", n)
    else:
        from sandboxes.fcm import make_service_account
        from worker.providers.fcm import Provider as Fcm

        sa = make_service_account(url + "/token", "bench")
        opts = {"service_account_json": json.dumps(sa), "base_url": url, "ca_file": ca, "token_url": url + "/token"}
        provider = Fcm(load_settings(home=home, provider_options={"fcm": opts}))
        msgs = bare_messages("push.android", n)
    try:
        provider.send(msgs[:1])  # connect and sign (fetch the token) before the clock starts
        t0, c0 = time.perf_counter(), time.process_time()
        ok = 0
        for i in range(0, n, batch):
            ok += sum(1 for o in provider.send(msgs[i : i + batch]) if type(o).__name__ == "Sent")
        return ok, time.perf_counter() - t0, time.process_time() - c0
    finally:
        provider.close()


# -- an asyncio client on h2 / jh2 (the providers' design before issue 20) ------------------------


def run_h2(module: str, validate: bool, url: str, ca: str, n: int, batch: int) -> tuple[int, float, float]:
    import ssl
    from urllib.parse import urlsplit

    h2config = importlib.import_module(f"{module}.config")
    h2connection = importlib.import_module(f"{module}.connection")
    events = importlib.import_module(f"{module}.events")
    parts = urlsplit(url)
    jwt_token, _ = _jwt()
    kw: dict[str, bool] = {}
    if not validate:
        kw = {"validate_outbound_headers": False, "normalize_outbound_headers": False,
              "validate_inbound_headers": False, "normalize_inbound_headers": False}  # fmt: skip

    class Conn(asyncio.Protocol):
        def __init__(self) -> None:
            config = h2config.H2Configuration(client_side=True, header_encoding="utf-8", **kw)
            self.h2 = h2connection.H2Connection(config)
            self.pending: dict[int, asyncio.Future[int]] = {}
            self.status: dict[int, int] = {}
            self.ready = asyncio.get_running_loop().create_future()
            self.window = asyncio.Event()

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.h2.initiate_connection()
            transport.write(self.h2.data_to_send())

        def data_received(self, data: bytes) -> None:
            for ev in self.h2.receive_data(data):
                if isinstance(ev, events.RemoteSettingsChanged) and not self.ready.done():
                    self.ready.set_result(None)
                elif isinstance(ev, events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[":status"])
                elif isinstance(ev, events.DataReceived):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, events.StreamEnded):
                    fut = self.pending.pop(ev.stream_id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(self.status.pop(ev.stream_id, 0))
                elif isinstance(ev, events.WindowUpdated):
                    self.window.set()
            data_out = self.h2.data_to_send()
            if data_out:
                self.transport.write(data_out)

        async def post(self, i: int) -> int:
            sid = self.h2.get_next_available_stream_id()
            headers = [(":method", "POST"), (":scheme", "https"), (":path", f"/3/device/{_token(i)}"),
                       (":authority", parts.netloc), *_apns_headers(i, jwt_token)]  # fmt: skip
            self.h2.send_headers(sid, headers)
            while self.h2.local_flow_control_window(sid) < len(BODY):
                self.window.clear()
                await self.window.wait()
            self.h2.send_data(sid, BODY, end_stream=True)
            fut = asyncio.get_running_loop().create_future()
            self.pending[sid] = fut
            self.transport.write(self.h2.data_to_send())
            return int(await fut)

    async def main() -> tuple[int, float, float]:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["h2"])
        loop = asyncio.get_running_loop()
        conns = []
        for _ in range(2):
            _t, c = await loop.create_connection(Conn, parts.hostname or "", parts.port or 443, ssl=ctx,
                                                 server_hostname=parts.hostname)  # fmt: skip
            await c.ready
            conns.append(c)
        t0, c0 = time.perf_counter(), time.process_time()
        ok = 0
        for s in range(0, n, batch):
            res = await asyncio.gather(*(conns[i % 2].post(i) for i in range(s, min(n, s + batch))))
            ok += sum(1 for r in res if r == 200)
        return ok, time.perf_counter() - t0, time.process_time() - c0

    return asyncio.run(main())


# -- pyreqwest (Rust) and aioapns -----------------------------------------------------------------------


def run_pyreqwest(url: str, ca: str, n: int, batch: int) -> tuple[int, float, float]:
    from pyreqwest.client import ClientBuilder

    jwt_token, _ = _jwt()

    async def main() -> tuple[int, float, float]:
        with open(ca, "rb") as f:
            client = ClientBuilder().http2_prior_knowledge().add_root_certificate_pem(f.read()).build()

        async def one(i: int) -> int:
            req = client.post(f"{url}/3/device/{_token(i)}").headers(dict(_apns_headers(i, jwt_token)))
            resp = await req.body_bytes(BODY).build().send()
            await resp.bytes()
            return int(resp.status)

        await asyncio.gather(*(one(i) for i in range(4)))
        t0, c0 = time.perf_counter(), time.process_time()
        ok = 0
        for s in range(0, n, batch):
            res = await asyncio.gather(*(one(i) for i in range(s, min(n, s + batch))))
            ok += sum(1 for r in res if r == 200)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        await client.close()
        return ok, elapsed, cpu

    return asyncio.run(main())


def run_aioapns(url: str, ca: str, n: int, batch: int) -> tuple[int, float, float]:
    import ssl
    from urllib.parse import urlsplit

    from aioapns import APNs, NotificationRequest
    from aioapns.connection import APNsProductionClientProtocol
    from cryptography.hazmat.primitives import serialization

    parts = urlsplit(url)
    # aioapns knows only Apple's hosts: point its production host at the sink
    APNsProductionClientProtocol.APNS_SERVER = parts.hostname  # type: ignore[assignment]
    APNsProductionClientProtocol.APNS_PORT = parts.port  # type: ignore[assignment]
    _, key = _jwt()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()  # fmt: skip

    async def main() -> tuple[int, float, float]:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["h2"])
        client = APNs(key=pem, key_id="BENCHKEY01", team_id="BENCHTEAM1", topic=TOPIC, max_connections=2,
                      use_sandbox=False, ssl_context=ctx)  # fmt: skip
        body = json.loads(BODY)

        async def one(i: int) -> bool:
            req = NotificationRequest(device_token=_token(i), message=body, collapse_key=f"campaign:c_bare:u{i:07d}",
                                      priority=5, time_to_live=86400)  # fmt: skip
            return bool((await client.send_notification(req)).is_successful)

        await asyncio.gather(*(one(i) for i in range(4)))
        t0, c0 = time.perf_counter(), time.process_time()
        ok = 0
        for s in range(0, n, batch):
            ok += sum(await asyncio.gather(*(one(i) for i in range(s, min(n, s + batch)))))
        return ok, time.perf_counter() - t0, time.process_time() - c0

    return asyncio.run(main())


def _child(candidate: str, url: str, ca: str, n: int, batch: int) -> dict[str, Any]:
    try:
        if candidate.endswith("-uvloop"):
            import uvloop

            uvloop.install()
        # CPU: of the timed loop, this process, every thread (libcurl's, tokio's)
        if candidate in ("apns", "fcm"):
            ok, elapsed, cpu = run_provider(candidate, url, ca, n, batch)
        elif candidate.startswith(("h2", "jh2")):
            module = "jh2" if candidate.startswith("jh2") else "h2"
            ok, elapsed, cpu = run_h2(module, candidate == "h2", url, ca, n, batch)
        elif candidate.startswith("pyreqwest"):
            ok, elapsed, cpu = run_pyreqwest(url, ca, n, batch)
        elif candidate == "aioapns":
            ok, elapsed, cpu = run_aioapns(url, ca, n, batch)
        else:
            return {"error": f"unknown candidate {candidate}"}
    except ImportError as exc:
        return {"error": f"not installed: {exc.name}"}
    return {"ok": ok, "per_s": round(ok / elapsed, 1), "cpu_us": round(cpu / max(1, n) * 1e6, 1)}


def compare(url: str, ca: str, n: int = 20000, batch: int = 1000, rounds: int = 3,
            candidates: tuple[str, ...] = CANDIDATES, log: Any = None) -> dict[str, Any]:  # fmt: skip
    """Every candidate ``rounds`` times, alternating; per candidate every run and the median."""
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in candidates}
    for r in range(rounds):
        for c in candidates:
            if runs[c] and "error" in runs[c][-1]:
                continue
            proc = subprocess.run([sys.executable, "-m", "bench.push_clients", c, "--url", url, "--ca", ca,
                                   "--n", str(n), "--batch", str(batch)], capture_output=True, text=True,
                                  timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if lines else {"error": (proc.stderr or "no output").strip()[-300:]}
            runs[c].append(res)
            if log:
                log(f"    round {r + 1} {c}: {res}")
    out: dict[str, Any] = {"n": n, "batch": batch, "rounds": rounds, "candidates": {}}
    for c, rs in runs.items():
        good = [x for x in rs if "error" not in x and x.get("ok") == n]
        if not good:
            out["candidates"][c] = {"error": (rs[-1] if rs else {}).get("error") or f"incomplete: {rs}"}
            continue
        out["candidates"][c] = {"per_s": statistics.median(x["per_s"] for x in good),
                                "cpu_us": statistics.median(x["cpu_us"] for x in good),
                                "runs": [x["per_s"] for x in good]}  # fmt: skip
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("candidate", nargs="?", choices=CANDIDATES)
    ap.add_argument("--url", help="the sink's base URL (default: start nginx)")
    ap.add_argument("--ca")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if a.candidate:
        print(json.dumps(_child(a.candidate, a.url, a.ca, a.n, a.batch)), flush=True)
    else:
        from bench.sinks import NginxSink, h2load

        with NginxSink() as sink:
            res = compare(sink.url, sink.ca_file, a.n, a.batch, a.rounds, log=print)
            res["h2load"] = h2load(f"{sink.url}/3/device/{_token(1)}", n=a.n, body=BODY)
        print(json.dumps(res, indent=1))
