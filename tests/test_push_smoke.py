"""The push smoke (issue 20): a few hundred pushes, half iOS and half Android, through the whole
pipeline (worker pool subprocesses, redis-server, SQLite) to the strict APNs and FCM sandboxes in
their own processes: every JWT verified against the key, every header and message checked, a
second provider token of the key within 20 minutes refused. A pool, then a second
``worker --burst``, then a ``--pool 4`` start: every push delivered once, with one JWT and one FCM
access token for them all. No timing is judged here (``make bench`` does)."""

from __future__ import annotations

from pathlib import Path

from bench.push_blast import strict_push_run


def test_pushes_through_the_pipeline_to_the_strict_sandboxes(tmp_path: Path) -> None:
    r = strict_push_run(300, pool=2, batch=100, tmp=tmp_path, timeout=120)
    assert r["sent"] == 300
    assert (r["apns_accepted"], r["fcm_accepted"]) == (150, 150)
    assert r["apns_jwts_seen"] == 1 and r["apns_token_updates_refused"] == 0
    assert r["fcm_token_requests"] == 1
