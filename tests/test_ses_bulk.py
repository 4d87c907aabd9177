"""SES bulk with per-recipient data (issue 15 item 1): a marketing batch whose bodies differ per
recipient stays a few ``SendBulkEmail`` calls, and every recipient gets exactly what Jinja rendered
for them. The AWS sandbox renders each entry as SES does with an inline template (simple ``{{name}}``
substitution from ``ReplacementTemplateData``, no HTML escaping) and hands it to moto's SendEmail, so
what the sandbox records is each recipient's copy as SES would build it."""

from __future__ import annotations

import math
from typing import Any

import httpx
import jinja2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifyctl.settings import Settings
from sandboxes.aws import AwsSandbox
from tests import bulk_email
from tests.bulk_email import TEXT, html, recipients
from tests.test_provider_reasons import moto_server  # noqa: F401 - the fixture
from worker.providers import ses
from worker.providers.base import Message, Sent
from worker.providers.ses import bulk

KEY_ID = "AKIASANDBOXTEST0003"
SECRET = "sandbox-secret-Pq3"
FROM = "notifications@example.com"

_html = jinja2.Environment(autoescape=True)
_text = jinja2.Environment(autoescape=False)
SUBJECT = _text.from_string("{{ name }}, {% if vip %}your code {{ code }}{% else %}this week{% endif %}")
HTML = html('<p>Footer shared by everyone. <a href="https://example.com/u/{{ uid }}">Unsubscribe</a></p>\n')


@pytest.fixture(scope="module")
def sandbox():
    sb = AwsSandbox(access_key_id=KEY_ID, secret_access_key=SECRET).start()
    sb.verify_identity("example.com")
    yield sb
    sb.stop()


@pytest.fixture(scope="module")
def provider(sandbox, tmp_path_factory):
    opts = {"endpoint_url": sandbox.url, "access_key_id": KEY_ID, "secret_access_key": SECRET}
    p = ses.Provider(Settings(home=tmp_path_factory.mktemp("ses"), email_from=FROM, provider_options={"ses": opts}))
    yield p
    p.close()


def message(i: int, content: dict[str, str], category: str = "marketing") -> Message:
    return bulk_email.message(i, content, category, headers={"List-Unsubscribe": f"<https://example.com/u/{i}>"})


def render(i: int, person: dict[str, Any]) -> dict[str, str]:
    return {"subject": SUBJECT.render(person), "text": TEXT.render(person), "html": HTML.render(person, uid=i)}


def send_and_rebuild(sandbox: AwsSandbox, provider: Any, contents: list[dict[str, str]]) -> dict[str, Any]:
    """Send, then check each recipient's copy as the sandbox built it against what was rendered."""
    sandbox.recorder.clear()
    sandbox.bulk_calls.clear()
    before = provider.fallbacks
    out = provider.send([message(i, c) for i, c in enumerate(contents)])
    assert all(isinstance(o, Sent) for o in out), out
    got = {r["message_id"]: r for r in sandbox.recorder.all()}
    assert len(got) == len(contents)
    for i, (c, o) in enumerate(zip(contents, out, strict=True)):
        mail = got[o.provider_message_id]
        assert mail["to"] == [f"user{i}@example.org"]
        assert (mail["subject"], mail["text"], mail["html"]) == (c["subject"], c.get("text"), c.get("html"))
        assert mail["headers"]["List-Unsubscribe"] == f"<https://example.com/u/{i}>"
    return {
        "bulk_calls": sorted((c["entries"] for c in sandbox.bulk_calls.all()), reverse=True),  # (concurrent)
        "bulk": [got[o.provider_message_id]["bulk"] for o in out],
        "fallbacks": provider.fallbacks - before,
    }


recipient = recipients("ab <>&\"'é€\n{}\\", max_size=10)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(recipient, min_size=2, max_size=60))
def test_every_recipient_gets_what_jinja_renders(sandbox, provider, people: list[dict[str, Any]]) -> None:
    contents = [render(i, p) for i, p in enumerate(people)]
    seen = send_and_rebuild(sandbox, provider, contents)
    braces = [any("{{" in v for v in c.values()) for c in contents]  # SES would read these: SendEmail
    assert not any(b and sent_in_bulk for b, sent_in_bulk in zip(braces, seen["bulk"], strict=True))
    if not any(ch in v for c in contents for v in c.values() for ch in "{}\\"):
        # nothing a key could sit next to: every message in as few calls as the chunk size allows
        assert seen["fallbacks"] == 0 and all(seen["bulk"])
        assert seen["bulk_calls"] == [min(50, len(people) - 50 * k) for k in range(math.ceil(len(people) / 50))]


def test_a_campaign_of_different_bodies_is_one_call_per_50(sandbox, provider) -> None:
    people = [
        {"name": f"<b>Ann</b> & co {i}", "vip": i % 3 == 0, "code": f"C{i:04d}", "items": [("tea", 1.5)] * (i % 4)}
        for i in range(120)
    ]
    contents = [render(i, p) for i, p in enumerate(people)]
    assert "&lt;b&gt;Ann&lt;/b&gt; &amp; co 7" in contents[7]["html"]  # Jinja escaped it; SES must not again
    seen = send_and_rebuild(sandbox, provider, contents)
    assert seen["bulk_calls"] == [50, 50, 20]
    assert seen["bulk"] == [True] * 120 and seen["fallbacks"] == 0
    # what went over the wire: the shared parts once, each recipient's own parts as replacement data
    req = sandbox.bulk_calls.all()[0]["request"]
    template = req["DefaultContent"]["Template"]["TemplateContent"]
    assert template["Html"].startswith("<h1>Hi ") and template["Html"].endswith('">Unsubscribe</a></p>')
    assert all(
        "Unsubscribe</a>" not in e["ReplacementEmailContent"]["ReplacementTemplate"]["ReplacementTemplateData"]
        for e in req["BulkEmailEntries"]
    )


LONG = _html.from_string(
    "<h1>Hi {{ name }}</h1>\n<ul>\n{% for label in items %}<li>{{ label }}</li>\n{% endfor %}</ul>\n"
    + "".join(f"<p>Shared paragraph {k}: " + "lorem ipsum " * 8 + "</p>\n" for k in range(40))
    + '<p><a href="https://example.com/u/{{ uid }}">Unsubscribe</a></p>'
)


def test_a_loop_and_a_personal_footer_still_share_the_rest(sandbox, provider) -> None:
    # each body has its own number of lines (the loop) and its own last line (the link): the 40
    # shared paragraphs between them still go once per call, not once per recipient
    contents = [
        {"subject": "Weekly", "html": LONG.render(name=f"P{i}", items=[f"item {j}" for j in range(i % 5)], uid=i)}
        for i in range(10)
    ]
    seen = send_and_rebuild(sandbox, provider, contents)
    assert seen["bulk_calls"] == [10]
    [call] = sandbox.bulk_calls.all()
    assert "Shared paragraph 39" in call["request"]["DefaultContent"]["Template"]["TemplateContent"]["Html"]
    for entry, c in zip(call["request"]["BulkEmailEntries"], contents, strict=True):
        data = entry["ReplacementEmailContent"]["ReplacementTemplate"]["ReplacementTemplateData"]
        assert "Shared paragraph" not in data and len(data) < len(c["html"]) / 10


def test_transactional_mail_shares_a_call_only_with_identical_bodies(sandbox, provider) -> None:
    contents = [render(i, {"name": f"n{i}", "vip": False, "code": "", "items": []}) for i in range(3)]
    sandbox.recorder.clear()
    sandbox.bulk_calls.clear()
    out = provider.send([message(i, c, category="transactional") for i, c in enumerate(contents)])
    assert all(isinstance(o, Sent) for o in out)
    assert sandbox.bulk_calls.all() == [] and len(sandbox.recorder) == 3


@pytest.mark.parametrize("shape", ["p{{{}}}", "{}}}", "C:\\{}"])
def test_a_key_next_to_a_brace_or_backslash_falls_back_and_is_counted(sandbox, provider, shape: str) -> None:
    # the bodies share "{" or "\\" just before where they differ, or "}" just after: {{{s0}}, {{s0}}}
    # and \\{{s0}} mean something else to SES's Handlebars (the sandbox refuses or keeps them as SES)
    contents = [
        {"subject": "Styles", "text": shape.format(name), "html": f"<b>{shape.format(name)}</b>"} for name in "AB"
    ]
    contents += [dict(contents[0]), dict(contents[0])]
    seen = send_and_rebuild(sandbox, provider, contents)
    assert seen["bulk_calls"] == [3]  # the identical ones still share a call
    assert seen["bulk"] == [True, False, True, True] and seen["fallbacks"] == 1


def test_an_entry_over_ses_replacement_data_limit_goes_alone(sandbox, provider) -> None:
    big = [(f"item {n} " + "x" * 90, float(n)) for n in range(bulk.MAX_ENTRY_DATA // 100 + 10)]
    people = [{"name": f"P{i}", "vip": False, "code": "", "items": big if i == 1 else []} for i in range(4)]
    contents = [render(i, p) for i, p in enumerate(people)]
    seen = send_and_rebuild(sandbox, provider, contents)
    assert seen["bulk"] == [True, False, True, True] and seen["fallbacks"] == 1
    assert seen["bulk_calls"] == [3]


def test_moto_without_send_bulk_email_delivers_every_personal_message(moto_server: str, tmp_path: Any) -> None:  # noqa: F811
    opts = {"endpoint_url": moto_server, "access_key_id": "AKIAMOTO", "secret_access_key": "x", "bulk_size": 5}
    provider = ses.Provider(Settings(home=tmp_path, email_from=FROM, provider_options={"ses": opts}))
    people = [
        {"name": f"<i>{i}</i>", "vip": i % 2 == 0, "code": f"K{i}", "items": [("a", i)] * (i % 3)} for i in range(12)
    ]
    contents = [render(i, p) for i, p in enumerate(people)]
    try:
        out = provider.send([message(i, c) for i, c in enumerate(contents)])
    finally:
        provider.close()
    assert all(isinstance(o, Sent) for o in out), out
    mails = httpx.get(f"{moto_server}/moto-api/data.json").json()["ses"]["Message"]  # what moto sent
    by_to = {m["destinations"]["ToAddresses"][0]: m for m in mails}
    assert sorted(by_to) == sorted(f"user{i}@example.org" for i in range(12)) and len(mails) == 12
    for i, c in enumerate(contents):
        assert (by_to[f"user{i}@example.org"]["subject"], by_to[f"user{i}@example.org"]["body"]) == (
            c["subject"],
            c["html"],
        )
