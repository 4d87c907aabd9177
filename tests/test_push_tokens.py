"""One provider token, shared (issue 20): one APNs JWT per team and key and one FCM access token per
service account for every worker process, through Redis; a refused token is replaced once for
everyone; ``TooManyProviderTokenUpdates`` is a throttle, never a spent attempt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from notifyctl import keys
from notifyctl.circuit import Circuits
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.settings import Settings
from sandboxes.apns import ApnsSandbox
from sandboxes.fcm import FcmSandbox
from tests.conftest import make_settings
from tests.util import IOS_TOKEN, deliveries, seed, send
from worker.pool import run_worker
from worker.providers import load_provider
from worker.providers.base import Message, Permanent, Sent
from worker.reconciler import reconcile

KEY_ID, TEAM_ID, TOPIC = "SHAREDKEY1", "SHAREDTEAM", "com.example.app"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def p8() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture
def strict_apns(p8: str) -> Iterator[ApnsSandbox]:
    """An APNs that refuses a second provider token of the same key within 20 minutes, as Apple does."""
    with ApnsSandbox({KEY_ID: p8}, topic=TOPIC, team_id=TEAM_ID, token_update_interval=1200) as sb:
        yield sb


@pytest.fixture
def fcm(tmp_path: Path) -> Iterator[FcmSandbox]:
    with FcmSandbox() as sb:
        yield sb  # type: ignore[misc]


def apns_options(sb: ApnsSandbox, p8: str) -> dict[str, Any]:
    return {"key": p8, "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC, "base_url": sb.url,
            "ca_file": str(sb.ca_file), "timeout": 10}  # fmt: skip


def fcm_options(sb: FcmSandbox, tmp_path: Path) -> dict[str, Any]:
    return {"service_account_file": str(sb.write_service_account(tmp_path / "sa.json")), "base_url": sb.url}


def msg(i: int, route: str = "push.ios") -> Message:
    address = f"{i:064x}"[-64:].replace("0", "a") if route == "push.ios" else f"fcm-token-{i}"
    return Message(delivery_id=f"d{i}", notification_id=f"n{i}", channel="push", route=route, address=address,
                   content={"title": "t", "body": "b"}, category="marketing", priority="low")  # fmt: skip


def children(specs: list[dict[str, Any]]) -> list[dict[str, list[list[str]]]]:
    """Start one process per spec, let them all send at once, and collect their outcomes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.push_child", json.dumps(s)], cwd=ROOT, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for s in specs
    ]  # fmt: skip
    for p in procs:  # each has built its providers (no token yet)
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_worker_processes_share_one_apns_jwt_and_one_fcm_token(
    strict_apns: ApnsSandbox, fcm: FcmSandbox, p8: str, redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    options = {"apns": apns_options(strict_apns, p8), "fcm": fcm_options(fcm, tmp_path)}
    spec = {"redis_url": redis_url, "home": str(tmp_path), "options": options, "n": 20}
    # three "workers" at once (a --pool 3 start), then a fourth (a second `worker --burst` minutes later)
    outs = children([{**spec, "tag": t} for t in ("a", "b", "c")]) + children([{**spec, "tag": "d"}])
    for out in outs:
        assert out["apns"] == [["Sent", ""]] * 20 and out["fcm"] == [["Sent", ""]] * 20
    assert len(strict_apns.tokens_seen) == 1 and strict_apns.token_updates_refused == 0
    assert len(strict_apns.recorder) == 80
    assert fcm.token_requests == 1 and len(fcm.recorder) == 80
    # the same without Redis: each process mints its own, and a strict APNs refuses the second one
    lone = children([{**spec, "redis_url": None, "options": {"apns": options["apns"]}, "tag": "e"}])[0]
    assert lone["apns"] == [["Retry", "TooManyProviderTokenUpdates"]] * 20
    assert len(strict_apns.tokens_seen) == 2 and strict_apns.token_updates_refused == 20


@pytest.mark.parametrize("reason", ["InvalidProviderToken", "ExpiredProviderToken"])
def test_a_refused_jwt_is_replaced_once_for_everyone(
    p8: str, rclient: redis.Redis, tmp_path: Path, reason: str
) -> None:
    with ApnsSandbox({KEY_ID: p8}, topic=TOPIC, team_id=TEAM_ID) as sb:
        settings = Settings(home=tmp_path, provider_options={"apns": apns_options(sb, p8)})
        workers = [load_provider("apns", settings, redis=rclient) for _ in range(4)]
        try:
            for i, w in enumerate(workers):
                assert isinstance(w.send([msg(i)])[0], Sent)
            [first] = sb.tokens_seen
            # every worker's next push is refused, for the token they all hold (the fault is tied
            # to that token: a resend with the new one is not refused, whatever the threads' order)
            sb.faults.add({"status": 403, "reason": reason, "count": 4, "jwt": first})
            barrier = threading.Barrier(4)
            outs: list[Any] = [None] * 4

            def push(i: int) -> None:
                barrier.wait()
                outs[i] = workers[i].send([msg(100 + i)])[0]

            threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if reason == "InvalidProviderToken":
                assert outs == [Permanent(reason)] * 4  # the push is refused; the token is replaced
            else:
                assert all(isinstance(o, Sent) for o in outs)  # resent once with the new token
            for i, w in enumerate(workers):
                assert isinstance(w.send([msg(200 + i)])[0], Sent)
            assert len(sb.tokens_seen) == 2 and sb.tokens_seen[0] == first  # exactly one refresh
            assert sum(w._tokens.minted for w in workers) == 2
        finally:
            for w in workers:
                w.close()


def test_a_refused_fcm_token_is_refreshed_once_for_everyone(
    fcm: FcmSandbox, rclient: redis.Redis, tmp_path: Path
) -> None:
    settings = Settings(home=tmp_path, provider_options={"fcm": fcm_options(fcm, tmp_path)})
    workers = [load_provider("fcm", settings, redis=rclient) for _ in range(3)]
    try:
        for i, w in enumerate(workers):
            assert isinstance(w.send([msg(i, "push.android")])[0], Sent)
        assert fcm.token_requests == 1
        fcm.revoke_tokens()  # every worker's token is now answered 401
        for i, w in enumerate(workers):
            assert isinstance(w.send([msg(10 + i, "push.android")])[0], Sent)
        assert fcm.token_requests == 2
    finally:
        for w in workers:
            w.close()


def test_too_many_provider_token_updates_uses_no_attempt(
    p8: str, home: Path, redis_url: str, rclient: redis.Redis
) -> None:
    with ApnsSandbox({KEY_ID: p8}, topic=TOPIC, team_id=TEAM_ID) as sb:
        settings = make_settings(home, redis_url, rate_limits=[], providers_push_ios=["apns"],
                                 provider_options={"apns": apns_options(sb, p8)}, retry_delays=[1])  # fmt: skip
        ctx = Context(settings)
        try:
            seed(ctx)
            sb.faults.add({"status": 429, "reason": "TooManyProviderTokenUpdates", "count": 3})
            nid = send(ctx, channels=["push"]).notification_id
            for _ in range(3):  # three refusals in a row: more than max_attempts (2) would allow
                run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
                [d] = deliveries(ctx, nid)
                assert (d.status, d.attempts, d.dead_lettered) == ("retrying", 0, False)
                assert d.reason == "TooManyProviderTokenUpdates"
                assert Circuits(rclient, 1, 60).all_states(["apns"])["apns"]["failing_batches"] == 0
                rclient.delete(keys.circuit("apns"))  # the throttle's wait, over
                # and the 200 s the reconcile below pretends went by for the pace the 429 started too
                # (notifyctl.pacing: a bucket refilled since then), else each round's job waits 2 s on it
                if rclient.exists(keys.pace("apns")):
                    rclient.hset(keys.pace("apns"), "ts", time.time() - 200)
                reconcile(ctx, now=time.time() + 200, force=True)
            run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
            [d] = deliveries(ctx, nid)
            assert (d.status, d.attempts) == ("sent", 1)
            assert [r["token"] for r in sb.recorder.all()] == [IOS_TOKEN]
        finally:
            ctx.close()
            dispose_all()
