"""A small batch (an OTP's job: one notification) is loaded in one SQL statement — its
notification, its user, the user's opt-outs and whether it has deliveries yet — with no Redis read
(the opt-outs once came from a cache in Redis: a round trip of their own); its deliveries are read only when it has
some. Large batches keep one query per table (``tests/test_pipeline.py``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, insert, update
from sqlalchemy.engine import Engine

from notifyctl.context import Context
from notifyctl.models import Notification, OptOut, utcnow
from tests.util import deliveries, seed, send
from worker.pipeline import Runtime, process


def _reads(ctx: Context) -> tuple[list[str], Any]:
    """The reads run: SELECTs, and on PostgreSQL the EXECUTEs of prepared SELECTs."""
    seen: list[str] = []
    prepared: dict[str, str] = {}  # name -> its statement's first word

    def on_exec(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        words = statement.split()
        if words[0] == "PREPARE":
            prepared[words[1].split("(")[0]] = words[words.index("AS") + 1]
        elif statement.startswith("SELECT set_config("):
            pass  # PostgreSQL's transaction-local setting for the analytics trigger: a write, not a read
        elif words[0] == "SELECT" or (words[0] == "EXECUTE" and prepared[words[1].split("(")[0]] == "SELECT"):
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", on_exec)
    return seen, on_exec


def test_an_otp_batch_loads_in_one_statement_and_reads_opt_outs_from_sql(any_db_ctx: Context) -> None:
    ctx = any_db_ctx
    seed(ctx)
    otp = send(ctx, template_id="otp_code", channels=["sms"], recipient_id="carol", data={"code": "1", "minutes": 5})
    mail = send(ctx, channels=["email"], recipient_id="alice")
    # an opt-out after intake took the request: the batch reads it
    with ctx.engine.begin() as conn:
        conn.execute(
            insert(OptOut), [{"user_id": "alice", "channel": "email", "category": "*", "created_at": utcnow()}]
        )
    rt = Runtime(ctx, worker_name="load")
    seen, on_exec = _reads(ctx)
    try:
        for nid in (otp.notification_id, mail.notification_id):
            seen.clear()
            assert process(rt, [nid]).notifications == 1
            assert len(seen) == 1, seen  # the load; no read of users, opt-outs or deliveries on their own
        (sms,) = deliveries(ctx, otp.notification_id)
        assert sms.status == "sent"
        assert [(d.status, d.reason) for d in deliveries(ctx, mail.notification_id)] == [
            ("suppressed", "opted_out:email:*")
        ]
        # run again (a recovered job): its deliveries are loaded (it has some), nothing is sent twice
        with ctx.engine.begin() as conn:
            conn.execute(update(Notification).where(Notification.id == otp.notification_id).values(status="queued"))
        seen.clear()
        process(rt, [otp.notification_id])
        assert len(seen) == 2, seen  # the load, then its deliveries
        assert [(d.id, d.status, d.attempts) for d in deliveries(ctx, otp.notification_id)] == [
            (sms.id, "sent", sms.attempts)
        ]
    finally:
        event.remove(Engine, "before_cursor_execute", on_exec)
        rt.close()
