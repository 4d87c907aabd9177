"""Secret template fields (issue 14, C): ``otp_code``'s ``code`` is never shown by the API,
``notifyctl events`` or the logs, and is erased from SQL once every delivery of the notification is
final — not before (a retry still sends it), and a DLQ replay afterwards fails with a clear reason."""

from __future__ import annotations

import json
import logging
import time
import zlib
from pathlib import Path

import httpx
import pytest
import redis
from typer.testing import CliRunner

from notifyctl.api.auth import create_key
from notifyctl.cli.main import app
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.directory import set_prefs
from notifyctl.dlq import DlqFilter, replay
from notifyctl.errors import TemplateError
from notifyctl.secretdata import ERASED_KEY, REDACTED, erase, redact
from notifyctl.settings import Settings
from notifyctl.template_store import TemplateStore
from notifyctl.templates import parse_template
from sandboxes.smtp import SmtpSandbox
from tests.conftest import cli_env
from tests.util import ApiServer, deliveries, drain, notification, seed, send
from worker.providers.outbox import read_outbox
from worker.reconciler import reconcile

CODE = "739146"  # unique enough to search every byte for
OTP = {"template_id": "otp_code", "priority": "high", "data": {"code": CODE, "minutes": 5}}


def redis_keys_holding(r: redis.Redis, needle: bytes) -> list[str]:
    """Every key whose name or any value holds ``needle`` (RQ's zlib-compressed job data included)."""
    found = []
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        values: list[bytes] = [key]
        if kind == "string":
            values.append(r.get(key) or b"")
        elif kind == "hash":
            values += [x for kv in r.hgetall(key).items() for x in kv]
        elif kind == "list":
            values += r.lrange(key, 0, -1)
        elif kind == "set":
            values += list(r.smembers(key))
        elif kind == "zset":
            values += r.zrange(key, 0, -1)
        elif kind == "stream":
            values += [x for _id, fields in r.xrange(key) for kv in fields.items() for x in kv]
        for v in values:
            try:
                v = v + zlib.decompress(v)
            except zlib.error:
                pass
            if needle in v:
                found.append(key.decode())
                break
    return found


def stored_data(ctx: Context, nid: str) -> dict:  # type: ignore[type-arg]
    dispose_all()  # a fresh read, not a session's cache
    return notification(ctx, nid).data


# -- the whole path, on SQLite and PostgreSQL ----------------------------------------------------


def test_otp_code_never_shown_and_erased_once_every_delivery_is_final(
    any_db_ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = any_db_ctx
    seed(ctx)
    res = send(ctx, channels=["sms", "email"], **OTP)
    assert res.status == "queued"
    order = send(ctx, channels=["email"], recipient_id="bob")  # a template without secrets
    assert stored_data(ctx, res.notification_id)["code"] == CODE  # needed until it is sent

    def shown() -> list[str]:
        """The notification as the API and `events --json` show it, before and after sending."""
        with ApiServer(ctx) as server:
            key = create_key(ctx, "t").key
            api = httpx.get(
                f"{server.url}/v1/notifications/{res.notification_id}", headers={"Authorization": f"Bearer {key}"}
            )
        assert api.status_code == 200
        assert api.json()["notification"]["data"] == {"code": REDACTED, "minutes": 5}
        cli = CliRunner().invoke(app, ["events", "--json", res.notification_id], env=cli_env(ctx.settings))
        assert cli.exit_code == 0, cli.output
        assert json.loads(cli.stdout)["notification"]["data"] == {"code": REDACTED, "minutes": 5}
        return [api.text, cli.output]

    for text in shown():
        assert CODE not in text

    caplog.set_level(logging.DEBUG)
    drain(ctx)
    assert {d.status for d in deliveries(ctx, res.notification_id)} == {"sent"}
    # the recipient got it (the outbox stands for their phone and mailbox: it keeps what it got)
    assert any(CODE in r["content"]["text"] for r in read_outbox(ctx.settings.outbox_dir, "sms"))
    data = stored_data(ctx, res.notification_id)
    assert data == {"minutes": 5, ERASED_KEY: ["code"]}
    assert notification(ctx, res.notification_id).status == "done"
    assert stored_data(ctx, order.notification_id) == {"order_id": "ORD-1", "tracking_url": "https://t.example/1"}
    for text in shown():  # erased reads the same as secret
        assert CODE not in text
    assert CODE not in caplog.text
    assert redis_keys_holding(ctx.redis, CODE.encode()) == []
    assert redis_keys_holding(ctx.redis, res.notification_id.encode())  # (the search does find what is there)


def test_suppressed_at_intake_is_stored_erased(ctx: Context) -> None:
    seed(ctx)
    set_prefs(ctx, "alice", ["sms", "email"], [])
    res = send(ctx, channels=["sms", "email"], **OTP)
    assert (res.status, res.reason) == ("suppressed", "opted_out")
    assert stored_data(ctx, res.notification_id) == {"minutes": 5, ERASED_KEY: ["code"]}


def test_suppressed_by_the_worker_is_erased(ctx: Context) -> None:
    seed(ctx)
    res = send(ctx, channels=["sms", "email"], **OTP)
    set_prefs(ctx, "alice", ["sms", "email"], [])  # opted out after intake: the worker suppresses
    drain(ctx)
    assert {d.status for d in deliveries(ctx, res.notification_id)} == {"suppressed"}
    assert stored_data(ctx, res.notification_id) == {"minutes": 5, ERASED_KEY: ["code"]}


# -- retries keep it, a replay after the erase says why it cannot send -----------------------------


def test_a_retry_still_has_the_code_and_it_is_erased_after(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "match": "alice@"})
    res = send(mctx, channels=["sms", "email"], **OTP)
    drain(mctx)
    by_channel = {d.channel: d.status for d in deliveries(mctx, res.notification_id)}
    assert by_channel == {"sms": "sent", "email": "retrying"}
    assert stored_data(mctx, res.notification_id)["code"] == CODE  # the email still needs it
    assert reconcile(mctx, now=time.time() + 31, force=True).retries_queued == 1
    drain(mctx)
    assert {d.status for d in deliveries(mctx, res.notification_id)} == {"sent"}
    [mail] = smtp.recorder.all()
    assert CODE in json.dumps(mail)  # the retry rendered the code
    assert stored_data(mctx, res.notification_id) == {"minutes": 5, ERASED_KEY: ["code"]}


def test_dlq_replay_after_the_erase_fails_with_a_clear_reason(mctx: Context, smtp: SmtpSandbox) -> None:
    smtp.faults.add({"smtp_code": 554, "smtp_message": "5.7.1 rejected by policy", "match": "alice@"})
    res = send(mctx, channels=["email"], **OTP)
    drain(mctx)
    [d] = deliveries(mctx, res.notification_id)
    assert (d.status, d.dead_lettered) == ("failed", True)
    assert CODE not in json.dumps(stored_data(mctx, res.notification_id))  # failed for good is final too

    assert replay(mctx, DlqFilter(ids=[d.id])).replayed == [d.id]
    assert reconcile(mctx, force=True).retries_queued == 1
    drain(mctx)
    [d] = deliveries(mctx, res.notification_id)
    assert (d.status, d.dead_lettered) == ("failed", False)  # not back to the DLQ: it can never be sent
    assert d.reason is not None and d.reason.startswith("secret_erased: template 'otp_code'")
    assert "code" in d.reason and "send a new notification" in d.reason
    assert smtp.recorder.all() == []
    assert notification(mctx, res.notification_id).status == "done"


# -- the template field and the helpers -------------------------------------------------------------


def test_shipped_otp_code_marks_code_secret(settings: Settings) -> None:
    assert TemplateStore.from_settings(settings).get("otp_code").secret == {"code"}
    assert TemplateStore.from_settings(settings).get("order_shipped_v2").secret == frozenset()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('secret = "code"', "secret must be a list of data field names"),
        ("secret = [1]", "secret must be a list of data field names"),
        ('secret = ["a b"]', "secret must be a list of data field names"),
        ('secret = ["user"]', "'user' is the recipient"),
    ],
)
def test_bad_secret_lists_are_one_line_errors(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "t.toml"
    p.write_text(f'category = "transactional"\n{line}\n[sms]\ntext = "{{{{ code }}}}"\n')
    with pytest.raises(TemplateError, match=message) as exc:
        parse_template(p)
    assert "\n" not in str(exc.value)


def test_erase_and_redact() -> None:
    data = {"code": "1", "minutes": 5}
    assert erase(data, frozenset()) is None and erase({"minutes": 5}, {"code"}) is None
    erased = erase(data, {"code"})
    assert erased == {"minutes": 5, ERASED_KEY: ["code"]} and data == {"code": "1", "minutes": 5}
    assert redact(data, {"code"}) == redact(erased, set()) == {"code": REDACTED, "minutes": 5}
    assert redact(data, frozenset()) == data
