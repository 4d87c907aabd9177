"""A worker-like process for the shared-token tests: ``python -m tests.push_child JSON`` builds the
APNs and FCM providers the way a worker does (``load_provider`` with the Redis client, when a
``redis_url`` is given), waits for the start signal (a line on stdin) so that several processes
send at once, sends ``n`` pushes through each, and prints their outcomes as JSON."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import redis

from notifyctl.settings import Settings
from worker.providers import Message, load_provider


def main(spec: dict) -> None:
    client = redis.Redis.from_url(spec["redis_url"]) if spec.get("redis_url") else None
    settings = Settings(home=Path(spec["home"]), provider_options=spec["options"])
    providers = {name: load_provider(name, settings, redis=client) for name in spec["options"]}
    print("ready", flush=True)
    sys.stdin.readline()
    out: dict[str, list[list[str]]] = {}
    for name, p in providers.items():
        msgs = []
        for i in range(spec["n"]):
            tag = f"{spec['tag']}-{name}-{i}"
            address = hashlib.sha256(tag.encode()).hexdigest() if name == "apns" else f"fcm-{tag}"
            msgs.append(Message(delivery_id=tag, notification_id=tag, channel="push",
                                route="push.ios" if name == "apns" else "push.android", address=address,
                                content={"title": "t", "body": "b"}, category="marketing", priority="low"))  # fmt: skip
        out[name] = [[type(o).__name__, getattr(o, "reason", "")] for o in p.send(msgs)]
        p.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
