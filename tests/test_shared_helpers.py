"""What the modules share (issue 16): the secret masker, the Retry-After parser, the vocabulary,
the error tree and its one translation of foreign errors, the provider contract, the eligibility
policy and the rate limiter's read-only count."""

from __future__ import annotations

import importlib
import inspect
import time
from email.utils import formatdate
from pathlib import Path

import httpx
import pytest
import redis
from pydantic import BaseModel, SecretStr, ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import create_engine, text

from notifyctl.errors import ApiError, BadJSON, ConfigError, InputError, NotFound, NotifyError, TemplateError, translate
from notifyctl.masking import mask
from notifyctl.policy import refusal
from notifyctl.settings import RateRule, Settings
from notifyctl.vocabulary import PROVIDERS, ROUTES
from tests.net import ClosedPort
from worker.providers import REGISTRY, apns, fcm, sns
from worker.providers.base import InvalidAddress, retry_after
from worker.ratelimit import Check, RateLimiter


def test_mask_shows_the_last_four_only_of_a_long_secret() -> None:
    assert mask(SecretStr("SG.abcdefghijklmnop1234")) == "****1234"
    assert mask("short-secret") == "(set)"  # 12 characters: four would give too much away
    assert mask("AKIA0001", reveal_from=9) == "(set)"
    assert mask("AKIA00001", reveal_from=9) == "****0001"
    assert mask(None) == mask("") == mask(SecretStr("")) == "(not set)"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(" 2.5 ") == 2.5
    assert retry_after("-4") == 0.0
    later = retry_after(formatdate(time.time() + 120, usegmt=True))
    assert later is not None and 100 < later <= 120
    assert retry_after(formatdate(time.time() - 120, usegmt=True)) == 0.0
    for unreadable in (None, "", "soon", "inf", "nan", "Mon, 99 Foo 2026"):
        assert retry_after(unreadable) is None, unreadable


def test_the_vocabulary_names_every_provider_and_route() -> None:
    assert tuple(REGISTRY) == PROVIDERS
    assert all("providers_" + route.replace(".", "_") in Settings.model_fields for route in ROUTES)


# --- the error tree (notifyctl.errors) -------------------------------------------------------


def test_each_error_knows_its_exit_code_and_http_status() -> None:
    assert [(e.exit_code, e.http_status) for e in (InputError, BadJSON, TemplateError, ConfigError, NotFound)] == [
        (2, 422),
        (2, 400),
        (2, 422),
        (3, 503),
        (4, 404),
    ]
    refused = ApiError(403, "bad signature", {"X-Why": "forged"})
    assert isinstance(refused, NotifyError) and (refused.http_status, refused.exit_code) == (403, 2)
    assert (refused.status, refused.message, refused.headers) == (403, "bad signature", {"X-Why": "forged"})
    assert ApiError(502, "upstream").exit_code == 1


def test_translate_turns_foreign_errors_into_one_line_ours(tmp_path: Path, closed_port: ClosedPort) -> None:
    port = closed_port.port  # held bound, never listening: refused
    with pytest.raises(redis.ConnectionError) as down:
        redis.Redis(port=port, socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)).ping()  # no retries: one refusal
    err = translate(down.value)
    assert isinstance(err, ConfigError) and str(err).startswith("Redis unreachable: ") and err.exit_code == 3
    assert err.public == "Redis unreachable" and str(port) not in err.public

    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(Exception) as sql, engine.connect() as conn:
        conn.execute(text("select * from no_such_table"))
    err = translate(sql.value)
    assert isinstance(err, ConfigError) and str(err) == "database error: no such table: no_such_table"
    engine.dispose()

    class Limits(BaseModel):
        batch_size: int

    with pytest.raises(ValidationError) as bad:
        Limits(batch_size="many")
    err = translate(bad.value)
    assert isinstance(err, ConfigError) and str(err).startswith("bad setting: batch_size: ")

    with pytest.raises(httpx.ConnectError) as unreachable:
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    err = translate(unreachable.value)
    assert isinstance(err, ConfigError) and str(err).startswith("network error: ") and "\n" not in str(err)

    ours = InputError("--channel: unknown channel 'fax'")
    assert translate(ours) is ours
    assert translate(KeyError("a bug")) is None


# --- the provider contract (worker.providers.base) -------------------------------------------


def test_invalid_address_says_what_to_do_about_the_address() -> None:
    assert apns._outcome(410, "Unregistered", {}, "id").kind == "dead_token"
    assert apns._outcome(400, "BadDeviceToken", {}, "id").kind == "dead_token"
    assert fcm.classify(404, "UNREGISTERED", "gone", None).kind == "dead_token"
    assert sns.classify("OptedOut", "Phone number is opted out", 400, None).kind == "stopped"
    assert sns.classify("InvalidParameter", "Invalid parameter: PhoneNumber", 400, None).kind == "invalid"
    assert InvalidAddress("x", kind="stopped") == InvalidAddress("x")  # the reason decides equality


def test_every_provider_has_the_one_constructor_shape_and_the_whole_protocol() -> None:
    for name, module in REGISTRY.items():
        cls = importlib.import_module(module).Provider
        params = list(inspect.signature(cls.__init__).parameters)
        assert params[:3] == ["self", "settings", "redis"], (name, params)
        assert inspect.signature(cls.__init__).parameters["redis"].default is None, name
        for method in ("send", "check", "describe", "close"):
            assert callable(getattr(cls, method, None)), (name, method)


# --- who may receive what (notifyctl.policy) -------------------------------------------------


def test_refusal_checks_opt_outs_then_address_then_sms_consent() -> None:
    out = {("email", "marketing"), ("*", "alerts")}
    assert refusal("email", "marketing", out, True, True).reason == "opted_out:email:marketing"
    assert refusal("sms", "alerts", out, False, False).reason == "opted_out:*:alerts"
    assert refusal("email", "transactional", out, False, True).reason == "no_address:email"
    assert refusal("sms", "marketing", set(), True, False).reason == "no_sms_opt_in"
    assert refusal("sms", "marketing", set(), True, True) is None
    assert refusal("sms", "transactional", set(), True, False) is None  # consent is for marketing


def test_rate_limit_counts_look_without_recording(rclient: redis.Redis) -> None:
    daily, hourly = RateRule.parse("sms:*:2/1d"), RateRule.parse("sms:marketing:1/1h")
    rl = RateLimiter(rclient, [daily, hourly])
    now = 1_700_000_000_000
    assert rl.counts(["u1", "u2"], [daily, hourly], now) == {
        ("u1", daily.key): 0,
        ("u1", hourly.key): 0,
        ("u2", daily.key): 0,
        ("u2", hourly.key): 0,
    }
    assert rl.check_many([Check("u1", "sms", "marketing", "n1:sms")], now) == [True]
    for _ in range(3):  # looking records nothing
        seen = rl.counts(["u1"], rl.rules_for("sms", "marketing"), now + 1000)
    assert seen == {("u1", daily.key): 1, ("u1", hourly.key): 1}
    assert rl.counts(["u1"], [hourly], now + 3600 * 1000) == {("u1", hourly.key): 0}  # the hour has passed
    assert rl.check_many([Check("u1", "sms", "marketing", "n2:sms")], now + 2000) == [False]  # as counted: full
