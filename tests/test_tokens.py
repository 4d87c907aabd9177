"""Device-token lifecycle: register/list/revoke, stale-token cleanup for cron, and tokens removed by a
provider's answer (the real FCM provider against the FCM sandbox) carrying the provider's reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import typer
from sqlalchemy import insert, select, update
from sqlmodel import Session
from typer.testing import CliRunner

from notifyctl.cli import tokens as tokens_cli
from notifyctl.cli.main import NotifyGroup
from notifyctl.context import Context
from notifyctl.db import dispose_all
from notifyctl.directory import register_token
from notifyctl.maintenance import cleanup_stale_tokens
from notifyctl.models import DeviceToken, utcnow
from sandboxes.fcm import FcmSandbox
from tests.conftest import cli_env, make_settings
from tests.util import ANDROID_TOKEN, IOS_TOKEN, deliveries, fcm_token, seed, send
from worker.pool import run_worker

root = typer.Typer(cls=NotifyGroup, pretty_exceptions_enable=False)
root.add_typer(tokens_cli.app, name="tokens")


@root.callback()
def _root() -> None:
    pass


runner = CliRunner()


def cli(ctx: Context, *args: str) -> Any:
    return runner.invoke(root, ["tokens", *args], env=cli_env(ctx.settings))


def cli_json(ctx: Context, *args: str) -> Any:
    r = cli(ctx, *args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def age(ctx: Context, token: str, created_days: float, success_days: float | None) -> None:
    now = utcnow()
    with Session(ctx.engine) as s:
        s.execute(
            update(DeviceToken)
            .where(DeviceToken.token == token)  # type: ignore[arg-type]
            .values(
                created_at=now - timedelta(days=created_days),
                last_success_at=None if success_days is None else now - timedelta(days=success_days),
            )
        )
        s.commit()


def live(ctx: Context) -> set[str]:
    with Session(ctx.engine) as s:
        return set(s.execute(select(DeviceToken.token).where(DeviceToken.removed_at.is_(None))).scalars())  # type: ignore[union-attr]


def test_register_list_revoke_still_work(ctx: Context) -> None:
    seed(ctx)
    r = cli(ctx, "register", "carol", "cd" * 32, "--platform", "ios")
    assert r.exit_code == 0 and "registered ios token" in r.stdout
    assert sorted(t["user_id"] for t in cli_json(ctx, "list")) == ["alice", "bob", "carol"]
    assert [t["token"] for t in cli_json(ctx, "list", "--user", "carol")] == ["cd" * 32]
    assert cli(ctx, "revoke", "cd" * 32).exit_code == 0
    gone = cli(ctx, "revoke", "cd" * 32)
    assert gone.exit_code == 4 and gone.stderr.startswith("error: no live token")
    [removed] = cli_json(ctx, "list", "--removed")
    assert removed["token"] == "cd" * 32 and removed["removed_reason"] == "revoked by operator"
    assert "Removed device tokens (1)" in cli(ctx, "list", "--removed").stdout
    # re-registering brings it back
    assert cli(ctx, "register", "carol", "cd" * 32, "--platform", "ios").exit_code == 0
    assert cli_json(ctx, "list", "--removed") == []


F = {name: fcm_token(name) for name in ("c1", "c2", "d1", "d2", "d3")}


def test_cleanup_removes_only_stale_tokens_idempotently(any_db_ctx: Context) -> None:
    seed(any_db_ctx)  # alice: IOS_TOKEN, bob: android-token-bob (both fresh)
    for user, tok in (("carol", "c1"), ("carol", "c2"), ("dave", "d1"), ("dave", "d2"), ("dave", "d3")):
        register_token(any_db_ctx, user, F[tok], "android")
    age(any_db_ctx, F["c1"], created_days=120, success_days=None)  # never worked, old: stale
    age(any_db_ctx, F["c2"], created_days=400, success_days=91)  # last success 91 d ago: stale
    age(any_db_ctx, F["d1"], created_days=400, success_days=10)  # old, but worked recently: kept
    age(any_db_ctx, F["d2"], created_days=89, success_days=None)  # young enough: kept
    age(
        any_db_ctx, F["d3"], created_days=300, success_days=200
    )  # stale, but already removed by the provider: untouched
    with Session(any_db_ctx.engine) as s:
        s.execute(
            update(DeviceToken)
            .where(DeviceToken.token == F["d3"])  # type: ignore[arg-type]
            .values(removed_at=utcnow() - timedelta(days=3), removed_reason="fcm: UNREGISTERED")
        )
        s.commit()

    dry = cli_json(any_db_ctx, "cleanup", "--stale-days", "90", "--dry-run")
    assert dry["dry_run"] is True and sorted(t["token"] for t in dry["removed"]) == [F["c1"], F["c2"]]
    assert live(any_db_ctx) == {IOS_TOKEN, ANDROID_TOKEN, F["c1"], F["c2"], F["d1"], F["d2"]}

    res = cli_json(any_db_ctx, "cleanup", "--stale-days", "90")
    assert res["removed_count"] == 2 and sorted(t["token"] for t in res["removed"]) == [F["c1"], F["c2"]]
    assert all(t["reason"] == "stale: no success in 90 days" for t in res["removed"])
    assert live(any_db_ctx) == {IOS_TOKEN, ANDROID_TOKEN, F["d1"], F["d2"]}

    again = cli(any_db_ctx, "cleanup", "--stale-days", "90")
    assert again.exit_code == 0 and "removed 0 stale token(s)" in again.stdout

    reasons = {t["token"]: t["removed_reason"] for t in cli_json(any_db_ctx, "list", "--removed")}
    assert reasons == {
        F["c1"]: "stale: no success in 90 days",
        F["c2"]: "stale: no success in 90 days",
        F["d3"]: "fcm: UNREGISTERED",
    }
    # A shorter threshold reaches further; the text says which threshold removed it.
    res = cli_json(any_db_ctx, "cleanup", "--stale-days", "5")
    assert [t["token"] for t in res["removed"]] == [F["d1"], F["d2"]]
    assert {t["reason"] for t in res["removed"]} == {"stale: no success in 5 days"}


def test_cleanup_is_batched_and_prints_what_it_removed(any_db_ctx: Context) -> None:
    seed(any_db_ctx)
    old = utcnow() - timedelta(days=365)
    rows = [
        {"token": f"stale-{i:05d}", "user_id": "bob", "platform": "android", "created_at": old} for i in range(2600)
    ]
    with Session(any_db_ctx.engine) as s:
        s.execute(insert(DeviceToken), rows)
        s.commit()
    calls: list[int] = []
    res = cleanup_stale_tokens(any_db_ctx, 90, progress=calls.append)
    assert calls == [1000, 1000, 600] and len(res.removed) == 2600  # three batches, counted
    assert live(any_db_ctx) == {IOS_TOKEN, ANDROID_TOKEN}

    with Session(any_db_ctx.engine) as s:
        s.execute(update(DeviceToken).values(removed_at=None, removed_reason=None))
        s.commit()
    r = cli(any_db_ctx, "cleanup")  # default --stale-days 90
    assert r.exit_code == 0
    assert "removed 2600 stale token(s)" in r.stdout and "stale-00000" in r.stdout
    assert "first 200 of 2600; --json lists all" in r.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["cleanup", "--stale-days", "0"], "--stale-days: must be between 1 and 36500, got 0"),
        (["cleanup", "--stale-days", "-5"], "--stale-days: must be between 1 and 36500, got -5"),
        (["cleanup", "--stale-days", "99999"], "--stale-days: must be between 1"),
    ],
)
def test_cleanup_bad_flags_are_one_line_exit_2(ctx: Context, args: list[str], message: str) -> None:
    r = cli(ctx, *args)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


def test_cleanup_non_integer_and_unknown_flags_are_exit_2(ctx: Context) -> None:
    assert cli(ctx, "cleanup", "--stale-days", "ninety").exit_code == 2
    assert cli(ctx, "cleanup", "--older", "9").exit_code == 2


# ── tokens removed by the provider's answer ─────────────────────────────────────────────────


@pytest.fixture
def fcm() -> Iterator[FcmSandbox]:
    with FcmSandbox(project_id="notifyctl-test") as sb:
        yield sb


@pytest.fixture
def fctx(home: Path, redis_url: str, rclient: redis.Redis, fcm: FcmSandbox, tmp_path: Path) -> Iterator[Context]:
    sa = fcm.write_service_account(tmp_path / "sa.json")
    ctx = Context(
        make_settings(
            home,
            redis_url,
            providers_push_android=["fcm"],
            provider_options={"fcm": {"service_account_file": str(sa), "base_url": fcm.url, "timeout": 5.0}},
        )
    )
    seed(ctx)
    yield ctx
    from worker import jobs

    jobs.close()
    ctx.close()
    dispose_all()


BOB_2 = fcm_token("android-token-bob-2")


def test_token_removed_by_provider_carries_its_reason_and_cleanup_leaves_it(fctx: Context, fcm: FcmSandbox) -> None:
    register_token(fctx, "bob", BOB_2, "android")
    fcm.unregistered.add(ANDROID_TOKEN)
    send(fctx, recipient_id="bob", channels=["push"])
    run_worker(fctx.settings, ["high", "normal", "low"], burst=True, reconcile=False)
    by_addr = {d.address: d for d in deliveries(fctx)}
    assert by_addr[BOB_2].status == "sent"
    assert by_addr[ANDROID_TOKEN].status == "failed" and not by_addr[ANDROID_TOKEN].dead_lettered

    [removed] = cli_json(fctx, "list", "--removed")
    assert removed["token"] == ANDROID_TOKEN and removed["removed_reason"].startswith("fcm: ")
    assert "UNREGISTERED" in removed["removed_reason"]
    provider_reason = removed["removed_reason"]
    # The successful token got last_success_at; cleanup with any threshold keeps it and the removed one's reason.
    with Session(fctx.engine) as s:
        ok = s.get(DeviceToken, BOB_2)
        assert ok is not None and ok.last_success_at is not None
    age(fctx, ANDROID_TOKEN, created_days=500, success_days=None)
    assert cli_json(fctx, "cleanup", "--stale-days", "1")["removed_count"] == 0
    [still] = cli_json(fctx, "list", "--removed")
    assert still["removed_reason"] == provider_reason
