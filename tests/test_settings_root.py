"""One settings root: read from the environment and the config file once, when it is built, and
every section (api, dlq, campaign, each provider) reached from it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import redis

from campaigns.config import campaign_config
from notifyctl.alerts import check_dlq_alert
from notifyctl.api.app import create_app
from notifyctl.context import Context
from notifyctl.settings import PROVIDER_NAMES, Settings
from notifyctl.unsubscribe import secret_key
from tests.conftest import invoke_cli, make_settings
from worker.providers import REGISTRY, load_provider

FIRST = {
    "NOTIFY_DLQ_ALERT_DEPTH": "0",  # an empty DLQ is at the threshold: the alert fires
    "NOTIFY_SECRET_KEY": "k" * 40,
    "NOTIFY_API_BRAND": "Acme",
    "NOTIFY_CAMPAIGN_DEFAULT_RATE": "5",
    "NOTIFY_SMTP_HOST": "mail.one.test",
    "NOTIFY_BATCH_SIZE": "11",
}
LATER = {
    "NOTIFY_DLQ_ALERT_DEPTH": "1000000",
    "NOTIFY_SECRET_KEY": "j" * 40,
    "NOTIFY_API_BRAND": "Other",
    "NOTIFY_CAMPAIGN_DEFAULT_RATE": "7",
    "NOTIFY_SMTP_HOST": "mail.two.test",
    "NOTIFY_BATCH_SIZE": "12",
}


def _observed(ctx: Context) -> dict[str, object]:
    """What the running components use, each asked the way the code asks it."""
    smtp = load_provider("smtp", ctx.settings)
    try:
        host = smtp.describe()["host"]
    finally:
        smtp.close()
    ctx.redis.delete("notif:dlq:alert")
    return {
        "dlq alert fires": check_dlq_alert(ctx).firing,
        "secret key": secret_key(ctx.settings),
        "api brand": create_app(ctx).state.api_config.brand,
        "campaign rate": campaign_config(ctx.settings).default_rate,
        "smtp host": host,
        "batch size": ctx.settings.batch_size,
    }


def test_an_environment_changed_after_the_root_is_built_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, home: Path, redis_url: str, rclient: redis.Redis, tmp_path: Path
) -> None:
    for k, v in FIRST.items():
        monkeypatch.setenv(k, v)
    ctx = Context(make_settings(home, redis_url))
    try:
        before = _observed(ctx)
        assert before == {
            "dlq alert fires": True,
            "secret key": b"k" * 40,
            "api brand": "Acme",
            "campaign rate": 5.0,
            "smtp host": "mail.one.test",
            "batch size": 11,
        }
        for k, v in LATER.items():
            monkeypatch.setenv(k, v)
        assert _observed(ctx) == before
    finally:
        ctx.close()

    # a root built now reads the new values: the change above was a real one
    later = Context(make_settings(tmp_path / "later", redis_url))
    try:
        assert _observed(later) == {
            "dlq alert fires": False,
            "secret key": b"j" * 40,
            "api brand": "Other",
            "campaign rate": 7.0,
            "smtp host": "mail.two.test",
            "batch size": 12,
        }
    finally:
        later.close()


def test_a_root_built_from_a_given_environment_reads_no_other(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_BATCH_SIZE", "9")
    monkeypatch.setenv("NOTIFY_API_BRAND", "Leaked")
    s = Settings.from_environ({"NOTIFY_BATCH_SIZE": "3"}, home=tmp_path)
    assert s.batch_size == 3 and s.api.brand == "notifyctl"
    assert Settings.from_environ({}, home=tmp_path).batch_size == 1000


def _provider_config(name: str) -> type | None:
    return getattr(importlib.import_module(REGISTRY[name]), "Config", None)


def test_every_section_is_reachable_from_the_root(tmp_path: Path) -> None:
    assert set(PROVIDER_NAMES) == set(REGISTRY)
    env = {
        "NOTIFY_API_SNS_MAX_AGE": "77",
        "NOTIFY_API_SNS_TOPIC_ARNS": '["arn:aws:sns:us-east-1:1:t"]',
        "NOTIFY_DLQ_ALERT_REPEAT_S": "77",
        "NOTIFY_CAMPAIGN_CHUNK_SIZE": "77",
    }
    configured = [n for n in sorted(REGISTRY) if _provider_config(n) is not None]
    assert len(configured) == len(REGISTRY) - 1  # all but the outbox, which has no settings
    for name in configured:
        env[f"NOTIFY_{name.upper()}_TIMEOUT"] = "7.5"
    s = Settings.from_environ(env, home=tmp_path)
    assert (s.api.sns_max_age, s.api.sns_topic_arns) == (77, ["arn:aws:sns:us-east-1:1:t"])
    assert (s.dlq.alert_repeat_s, s.campaign.chunk_size) == (77, 77)
    for name in configured:
        config_cls = _provider_config(name)
        assert config_cls is not None
        assert s.provider_settings(name, config_cls).timeout == 7.5, name


def test_config_file_tables_old_and_new(tmp_path: Path) -> None:
    """``[api]``, ``[campaign]``, ``[dlq]`` and a provider's ``[NAME]``; the older
    ``[provider_options.NAME]`` and the main ``smtp_*`` still read, below the newer spelling and
    below the environment."""
    (tmp_path / "config.toml").write_text(
        'smtp_host = "mail.main.test"\nsmtp_port = 2525\n'
        '[api]\nbrand = "New"\n'
        '[provider_options.api]\nbrand = "Old"\nhelp_text = "Old help"\n'
        "[provider_options.campaign]\nchunk_size = 9\n"
        "[dlq]\nalert_depth = 3\n"
        '[sendgrid]\napi_key = "SG.new"\n'
        '[provider_options.sendgrid]\napi_key = "SG.old"\nfrom_name = "Old name"\n'
        "[provider_options.smtp]\nport = 2526\n"
    )
    s = Settings.from_environ({"NOTIFY_SENDGRID_FROM_NAME": "Env name"}, home=tmp_path)
    assert (s.api.brand, s.api.help_text, s.campaign.chunk_size, s.dlq.alert_depth) == ("New", "Old help", 9, 3)
    assert s.provider_options["sendgrid"] == {"api_key": "SG.new", "from_name": "Env name"}
    assert s.provider_options["smtp"] == {"host": "mail.main.test", "port": 2526}


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        ("NOTIFY_API_SNS_MAX_AGE", "0", "bad setting: api.sns_max_age"),
        ("NOTIFY_API_SNS_TOPIC_ARNS", "arn:not-json", "bad setting: NOTIFY_API_SNS_TOPIC_ARNS is not JSON"),
        ("NOTIFY_RATE_LIMITS", "push:*:3/1h", "bad setting: NOTIFY_RATE_LIMITS is not JSON"),
        ("NOTIFY_DLQ_ALERT_DEPTH", "many", "bad setting: dlq.alert_depth"),
        ("NOTIFY_CAMPAIGN_CHUNK_SIZE", "0", "bad setting: campaign.chunk_size"),
    ],
)
def test_a_bad_section_value_is_one_line(settings: Settings, var: str, value: str, message: str) -> None:
    r = invoke_cli(settings, "dlq", "list", **{var: value})
    assert r.returncode == 3, r.stderr
    assert r.stderr.startswith("error: " + message) and r.stderr.count("\n") == 1, r.stderr
