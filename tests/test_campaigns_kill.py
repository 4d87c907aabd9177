"""A launcher killed with -9 mid-way and relaunched: every recipient is written once, at the due_at the
uninterrupted run would have given, and the workers then send each of them exactly once."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlmodel import Session

from campaigns.launcher import resume_launch
from campaigns.report import campaign_status
from notifyctl.context import Context
from notifyctl.directory import import_users
from notifyctl.models import Delivery, Notification
from tests.conftest import ROOT, cli_env
from worker.pool import run_worker
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile

N, RATE = 1500, 250.0
KILL_AT = 400  # rows written when the launcher is killed

LAUNCHER = """
import sys
from campaigns.launcher import LaunchSpec, launch
from notifyctl.context import Context
from notifyctl.settings import load_settings

def progress(phase, done, total):
    if phase == "write":
        print(done, flush=True)
        if done >= int(sys.argv[4]):
            sys.stdin.readline()  # mid-way: wait here to be killed (the test never writes)

spec = LaunchSpec("weekly_promo", channels=["email"], segment_csv=sys.argv[1], send_at=sys.argv[2], rate=float(sys.argv[3]),
                  name="killed", data={"discount": 5, "code": "K"})
launch(Context(load_settings()), spec, progress=progress)
print("finished", flush=True)
"""


def count(ctx: Context) -> int:
    with Session(ctx.engine) as s:
        return s.execute(select(func.count()).select_from(Notification)).scalar_one()


def test_launcher_killed_mid_way_then_relaunched_writes_and_sends_everyone_once(ctx: Context) -> None:
    rep = import_users(ctx, io.StringIO("user_id,email\n" + "".join(f"k{i},k{i}@example.com\n" for i in range(N))))
    assert rep.imported == N
    seg = ctx.settings.home / "k.csv"
    seg.write_text("user_id,first_name\n" + "".join(f"k{i},K{i}\n" for i in range(N)))
    t0 = (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0)
    env = cli_env(ctx.settings, NOTIFY_CAMPAIGN_CHUNK_SIZE="50")
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(seg), t0.isoformat(), str(RATE), str(KILL_AT)],
        env=env, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        reported: list[int] = []
        for line in iter(proc.stdout.readline, ""):
            reported.append(int(line))
            if reported[-1] >= KILL_AT:
                break  # the launcher now waits, mid-way, with that many rows written
        partial = count(ctx)
        os.kill(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err
    assert reported and reported[-1] >= KILL_AT, (reported, err[-2000:])
    assert "finished" not in out
    assert KILL_AT <= partial < N and count(ctx) == partial, partial
    assert campaign_status(ctx, "killed")["state"] == "launching"

    s = resume_launch(ctx, "killed")
    assert s["written"] == N - partial and s["skipped_existing"] == partial and s["recipients"] == N
    again = resume_launch(ctx, "killed")  # a second relaunch is a no-op
    assert again["written"] == 0 and again["skipped_existing"] == N

    with Session(ctx.engine) as sess:
        rows = sess.execute(
            select(Notification.recipient_id, Notification.due_at).where(Notification.campaign_id == s["campaign_id"])
        ).all()
    per_user = Counter(uid for uid, _ in rows)
    assert len(per_user) == N and set(per_user.values()) == {1}
    # the same schedule as an uninterrupted run: recipient k at t0 + k/rate
    for uid, due in rows:
        k = int(uid[1:])
        due = due if due.tzinfo else due.replace(tzinfo=UTC)
        assert due == t0 + timedelta(seconds=k / RATE), uid
    assert campaign_status(ctx, "killed")["state"] == "sending"

    reconcile(ctx, now=t0.timestamp() + N / RATE + 1, force=True, limit=100_000)
    run_worker(ctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    with Session(ctx.engine) as sess:
        sent = Counter(
            uid
            for (uid,) in sess.execute(
                select(Delivery.user_id).where(Delivery.status == "sent", Delivery.channel == "email")
            ).all()
        )
    assert len(sent) == N and set(sent.values()) == {1}
    outbox = Counter(r.get("address") or r.get("to") for r in read_outbox(ctx.settings.outbox_dir, "email"))
    assert len(outbox) == N and set(outbox.values()) == {1}
    st = campaign_status(ctx, "killed")
    assert st["state"] == "completed" and st["per_channel"]["email"]["sent"] == N
