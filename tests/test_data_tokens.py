"""Issue 15: a batch whose notifications each carry data of their own (a segment's columns) renders
each template once, with a token for every value the channel only prints
(``Template.direct_data_names``), and puts each recipient's values in — one SendGrid request
with the values as substitutions. Every recipient, as the SendGrid sandbox rebuilds their copy,
must get exactly what Jinja renders for their data, whatever the values and whatever else the
template does with them (conditions, loops, filters, blocks)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from notifyctl.context import Context
from notifyctl.directory import import_users
from notifyctl.errors import TemplateError
from notifyctl.intake import user_vars
from notifyctl.models import User
from notifyctl.template_store import TemplateStore
from notifyctl.templates import parse_text
from sandboxes.sendgrid import DEFAULT_API_KEY, SendgridSandbox
from tests.conftest import make_settings
from tests.util import send
from worker.pipeline import Runtime, process
from worker.pipeline.batch import _Note, _User
from worker.pipeline.render import Renderer, _fill

# what each recipient's data may hold: HTML specials, unicode, numbers, booleans, edge whitespace,
# the pipeline's and SendGrid's token look-alikes, the template separator, empty, long, null
VALUES: list[Any] = [
    'Dan & <Co> "q"',
    "Zoë 🎉",
    42,
    3.5,
    True,
    "  padded ",
    "%%notifyctl:dt:code%%",
    "%%notifyctl:t:first_name%%",
    "[%sg0%]",
    "a\x1e\x1db",
    "",
    "x" * 1500,
    "y" * 900,
    None,
    "plain",
]

TEMPLATES = {
    # the shipped weekly_promo's shape: printed fields with fallbacks to the data and to `user`
    "promo": '''category = "marketing"
[email]
subject = "{{ first_name | default(user.first_name | default('Hello')) }}, {{ discount }}% off"
html = """
<h1>{{ discount }}% off</h1>
<p>Hi {{ first_name | default(user.first_name | default('there')) }}, code <strong>{{ code }}</strong>.</p>
<a href="https://shop.example/?c={{ code }}">{{ note | default('') }}</a>
"""
text = """
{{ discount }}% off.
Hi {{ first_name | default(user.first_name | default('there')) }}, use {{ code }}.
{{ note | default('') }}
"""
''',
    # values at a part's very start and end: SendGrid puts a substitution back as it is, where
    # rendering strips each part, so a value with edge whitespace is never a token there
    "edge": '''category = "marketing"
[email]
subject = "{{ code }}"
html = """{{ first_name | default('x') }} <b>{{ code }}</b> {{ note | default('') }}"""
text = """{{ first_name | default('x') }} {{ code }}"""
''',
    # what may not be tokenized: a condition, a loop, a filter, a filter block, an autoescape block,
    # a macro and a set block, beside fields printed as they are
    "mixed": '''category = "marketing"
[email]
subject = "{{ code }} {{ first_name | upper if first_name is string else first_name }}"
html = """
{% if vip %}<b>VIP {{ code }}</b>{% endif %}
<ul>{% for item in items %}<li>{{ item }} {{ code }}</li>{% endfor %}</ul>
{% filter upper %}{{ note | default('-') }}{% endfilter %}
{% autoescape false %}{{ raw | default('') }}{% endautoescape %}
{% macro m(x) %}[{{ x }}]{% endmacro %}{{ m(code) | lower }}
{% set box %}{{ first_name }}{% endset %}{{ box | length }}
"""
text = """{{ code }}{% for item in items %} {{ item }}{% endfor %} {{ first_name }}"""
''',
}


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SendgridSandbox]:
    sb = SendgridSandbox(api_key=DEFAULT_API_KEY).start()
    yield sb
    sb.stop()


def _data(i: int) -> dict[str, Any]:
    v = VALUES[i % len(VALUES)]
    w = VALUES[(i * 7 + 3) % len(VALUES)]
    data: dict[str, Any] = {"discount": 20, "code": f"C{i:03d}<&>", "vip": i % 2 == 0, "items": [f"i{i}", w]}
    if v is not None:
        data["first_name"] = v
    if w is not None:
        data["note"] = w
        data["raw"] = w
    return data


@pytest.mark.parametrize("template_id", sorted(TEMPLATES))
def test_each_recipient_gets_exactly_what_jinja_renders(
    home: Path, redis_url: str, rclient: Any, tmp_path: Path, sandbox: SendgridSandbox, template_id: str
) -> None:
    tdir = tmp_path / "tpl"
    tdir.mkdir()
    for tid, src in TEMPLATES.items():
        (tdir / f"{tid}.toml").write_text(src)
    opts = {"api_key": DEFAULT_API_KEY, "base_url": sandbox.url}
    settings = make_settings(home, redis_url, templates_dir=tdir, rate_limits=[], public_url="https://n.example",
                             postal_address="1 Main St", providers_email=["sendgrid"],
                             provider_options={"sendgrid": opts})  # fmt: skip
    ctx = Context(settings)
    n = 2 * len(VALUES)
    csv = "user_id,email,first_name\n" + "".join(f"r{i},r{i}@example.com,U{i}\n" for i in range(n))
    assert import_users(ctx, io.StringIO(csv)).errors == []
    t = TemplateStore([tdir]).get(template_id)
    datas = {f"r{i}": _data(i) for i in range(n)}
    nids = []
    for uid, d in list(datas.items()):
        try:
            nids.append(
                send(ctx, recipient_id=uid, template_id=template_id, channels=["email"], data=d).notification_id
            )
        except TemplateError:  # intake renders the data once: what cannot render is refused there
            del datas[uid]
    n = len(datas)
    sandbox.recorder.clear()
    stats = process(Runtime(ctx), nids)
    got = {m["to"]: m for m in sandbox.recorder.all()}
    with ctx.engine.connect() as conn:
        users = {u.id: u for u in conn.execute(User.__table__.select())}  # type: ignore[attr-defined]
    renders = 0
    for uid, data in datas.items():
        try:
            want = t.render("email", {**data, "user": user_vars(users[uid])})
        except TemplateError:  # (a null loop item, a missing name): failed, not sent
            assert f"{uid}@example.com" not in got
            continue
        renders += 1
        mail = got[f"{uid}@example.com"]
        assert mail["subject"] == want["subject"], (uid, data)
        # the pipeline appends the unsubscribe footer and the open pixel
        text = mail["content"]["text/plain"].split("\n\n--\nUnsubscribe: ")[0]
        html = mail["content"]["text/html"].split('\n<p style="font-size:small;color:#666"><a href=')[0]
        assert (text, html) == (want["text"], want["html"]), (uid, data)
    assert stats.sent == renders == len(got) and stats.failed == n - renders
    assert renders > n // 2
    ctx.close()


def test_a_segment_batch_is_one_request(home: Path, redis_url: str, rclient: Any, sandbox: SendgridSandbox) -> None:
    """The bench's shape: the shipped weekly_promo, each recipient a name and a code of their own
    (the segment's columns), the campaign's discount for all: one request for the batch, each
    copy exactly the template's rendering."""
    opts = {"api_key": DEFAULT_API_KEY, "base_url": sandbox.url}
    settings = make_settings(home, redis_url, rate_limits=[], public_url="https://n.example", postal_address="1 Main St",
                             providers_email=["sendgrid"], provider_options={"sendgrid": opts})  # fmt: skip
    ctx = Context(settings)
    n = 40
    csv = "user_id,email\n" + "".join(f"s{i},s{i}@example.com\n" for i in range(n))
    assert import_users(ctx, io.StringIO(csv)).errors == []
    datas = {f"s{i}": {"discount": 20, "first_name": f"Name{i} & <b>", "code": f"C{i:07d}Z"} for i in range(n)}
    nids = [send(ctx, recipient_id=uid, template_id="weekly_promo", channels=["email"], data=d).notification_id
            for uid, d in datas.items()]  # fmt: skip
    before = len(sandbox.accepted_requests)
    sandbox.recorder.clear()
    assert process(Runtime(ctx), nids).sent == n
    assert sandbox.accepted_requests[before:] == [n]
    t = ctx.templates.get("weekly_promo")
    got = {m["to"]: m for m in sandbox.recorder.all()}
    for uid, data in datas.items():
        want = t.render("email", {**data, "user": {}})
        mail = got[f"{uid}@example.com"]
        assert mail["subject"] == want["subject"]
        assert mail["content"]["text/plain"].startswith(want["text"] + "\n\n--\nUnsubscribe: https://n.example/u/")
        assert mail["content"]["text/html"].startswith(want["html"] + '\n<p style="font-size:small;color:#666">')
    ctx.close()


# templates that print data as it is, and do other things with it (a value printed one way and
# tested, filtered, looped over, captured or escaped otherwise elsewhere)
SOURCES = [
    ("{{ a }}, {{ b | default('-') }}", "<p>{{ a }}</p><i>{{ c | default(b | default(user.first_name)) }}</i>"),
    ("{% if a %}{{ a }}{% endif %} {{ b }}", "{{ a | default('') }}{% for x in c %}[{{ x }}]{% endfor %}{{ b }}"),
    ("{{ a | upper if a is string else a }} {{ b }}", "{% filter lower %}{{ b }}{% endfilter %}{{ a }}"),
    (
        "{% set s %}{{ a }}{% endset %}{{ s | length }} {{ b }}",
        "{% autoescape false %}{{ a }}{% endautoescape %}{{ b }}",
    ),
    ("{% macro m(v) %}<{{ v }}>{% endmacro %}{{ m(a) }} {{ b }}", "{{ a ~ b }} {{ b }}"),
    ("  {{ a }}\n{{ b }}  ", "\n{{ b }} {{ a }} {{ b }}\n"),
]
value = st.one_of(
    st.none(),
    st.text(alphabet=st.sampled_from("ab <>&\"'é\x1e\x1d%"), max_size=8),
    st.sampled_from(["%%notifyctl:dt:b%%", "%%notifyctl:t:first_name%%", "x" * 1001, " pad "]),
    st.integers(-5, 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.text(max_size=3), max_size=3),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(range(len(SOURCES))), st.lists(st.fixed_dictionaries({}, optional={"a": value, "b": value, "c": value}), min_size=1, max_size=6))  # fmt: skip
def test_the_batch_rendering_with_tokens_is_each_recipients_rendering(ctx: Context, which: int, datas: list[dict[str, Any]]) -> None:  # fmt: skip
    """Whatever the values: each recipient's copy from the batch's rendering with tokens is exactly
    Jinja's rendering of their data, and where Jinja refuses their data no copy is made."""
    text, html = SOURCES[which]
    t = parse_text(
        f"category = 'marketing'\n[email]\nsubject = 's'\nhtml = '''{html}'''\ntext = '''{text}'''\n", "t", "t"
    )
    renderer = Renderer(Runtime(ctx, "w-tokens"))
    notes = [_Note(f"n{i}", "u", "t", "t", "marketing", "low", None, ["email"], d, json.dumps(d) + str(i))
             for i, d in enumerate(datas)]  # fmt: skip
    renderer.loaded(notes)
    user = _User("u", "u@example.com", None, "UTC", "en", False, {"first_name": "Ann & <Co>"})
    for n in notes:
        try:
            want: dict[str, str] | None = t.render("email", {**n.data, "user": user_vars(user)})  # type: ignore[arg-type]
        except TemplateError:
            want = None
        pv = renderer.data_probe(n, "email", t, user)
        if pv is None:
            continue  # rendered the ordinary way
        got = {part: _fill(piece, pv[1], tuple(k for k in pv[1] if k in piece)) for part, piece in pv[0].items()}
        assert got == want, (n.data, pv)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["id", "email", "locale", "timezone", "phone", "first_name", "plan"]),
                    st.one_of(st.none(), st.text(max_size=5), st.integers()), max_size=4),
    st.one_of(st.none(), st.text(max_size=5)),
)  # fmt: skip
def test_a_recipients_field_is_the_one_user_vars_gives(attributes: dict[str, Any], email: str | None) -> None:
    """``render._user_field`` (a printed field, read without making ``user_vars``' dict) is
    ``user_vars(user).get(name)`` for every name: the user's columns, attributes of the same name
    (which win), names neither has."""
    from worker.pipeline.render import _user_field

    user = _User(id="u1", email=email, phone="+15550001", timezone="Europe/Paris", locale="fr",
                 sms_opt_in=True, attributes=attributes)  # fmt: skip
    want = user_vars(user)  # type: ignore[arg-type]
    for name in ("id", "email", "locale", "timezone", "phone", "sms_opt_in", "first_name", "plan", "attributes"):
        assert _user_field(user, name) == want.get(name), name


def test_an_emails_own_copy_is_made_only_when_read(home: Path, redis_url: str, rclient: Any) -> None:
    """A recipient's email whose body goes shared, with their values as substitutions (SendGrid),
    is made only when read (``_EmailMessage``): its subject and whether it has a text or an HTML
    part are there without it, and its content, once read, is exactly Jinja's rendering of their
    data with the footer (the unsubscribe link, the postal address, the open pixel) — whatever the
    values, for marketing and for not."""
    from notifyctl.inbound import pixel_url
    from notifyctl.unsubscribe import unsubscribe_url
    from worker.pipeline.batch import _D
    from worker.pipeline.render import _CONTENT, _EmailMessage
    from worker.providers import Message

    conf = make_settings(home, redis_url, public_url="https://n.example", postal_address="1 Main & Co")
    ctx = Context(conf)
    rt = Runtime(ctx, "w-lazy")
    user = _User("u", "u@example.com", None, "UTC", "en", False, {"first_name": "Ann & <Co>"})
    lazy = [0]

    @settings(max_examples=150, deadline=None)
    @given(st.sampled_from(range(len(SOURCES))), st.lists(st.fixed_dictionaries({}, optional={"a": value, "b": value, "c": value}), min_size=1, max_size=6), st.booleans())  # fmt: skip
    @example(5, [{"a": "", "b": ""}, {"a": "x", "b": ""}], False)  # (a text part that values leave empty)
    def check(which: int, datas: list[dict[str, Any]], marketing: bool) -> None:
        text, html = SOURCES[which]
        src = f"category = 'marketing'\n[email]\nsubject = '{{{{ b | default(\"s\") }}}}'\nhtml = '''{html}'''\ntext = '''{text}'''\n"
        t = parse_text(src, "t", "t")
        renderer = Renderer(rt)
        renderer.templates["t"] = t
        notes = [_Note(f"n{i}", "u", "t", "t", "marketing" if marketing else "transactional", "low", None,
                       ["email"], d, json.dumps(d) + str(i)) for i, d in enumerate(datas)]  # fmt: skip
        renderer.loaded(notes)
        for i, n in enumerate(notes):
            try:
                want = t.render("email", {**n.data, "user": user_vars(user)})  # type: ignore[arg-type]
            except TemplateError:
                continue
            content = renderer.render(n, "email", user)
            assert not isinstance(content, str)
            pv = renderer.probed.get((n.id, "email"))
            values = pv[1] if pv else None
            plan = renderer.email_plan(pv[0] if pv else content, values, marketing)
            d = _D(f"d{i}", n.id, "u", "email", "email", "u@example.com", "queued")
            own, shared, personal, headers = plan.apply(rt, d, values)
            pixel = pixel_url(conf, rt.unsub_key, d.id)
            assert pixel is not None
            foot = {"text": "", "html": f'\n<img src="{pixel}" width="1" height="1" alt="">'}
            if marketing:
                url = unsubscribe_url(conf, rt.unsub_key, "u")
                assert url is not None and headers["List-Unsubscribe"] == f"<{url}>"
                foot["text"] = f"\n\n--\nUnsubscribe: {url}\n1 Main & Co"
                foot["html"] = f'\n<p style="font-size:small;color:#666"><a href="{url}">Unsubscribe</a> · 1 Main &amp; Co</p>' + foot["html"]  # fmt: skip
            expected = {part: want[part] + foot.get(part, "") for part in ("subject", "text", "html")}
            if own is not None:  # nothing shared: made as it is
                assert shared is None and own == expected
                continue
            lazy[0] += 1
            msg = _EmailMessage(delivery_id=d.id, notification_id=n.id, channel="email", route="email",
                                address="u@example.com", content=None, category="marketing", priority="low",
                                shared=shared, personal=personal)  # type: ignore[arg-type]  # fmt: skip
            msg.plan = plan
            for part in ("subject", "text", "html", "title"):
                assert msg.part(part) == expected.get(part, "")
                assert msg.has(part) == bool(expected.get(part))
            assert _CONTENT.__get__(msg, Message) is None  # not made yet
            assert msg.content == expected
            assert _CONTENT.__get__(msg, Message) is msg.content  # made once, kept
            assert msg.part("text") == expected["text"] and msg.has("html")
            # what SendGrid sends them: each token of the shared body replaced by its value, as it is
            for part, piece in shared.items():
                for token, v in personal.items():
                    piece = piece.replace(token, v)
                assert piece == expected[part]

    check()
    assert lazy[0] > 0  # (some bodies did go shared)
    ctx.close()


_PUSH_PROMO = parse_text(
    "category = 'marketing'\n[push]\ntitle = '{{ discount }}% off'\n"
    "body = \"Hi {{ first_name | default(user.first_name | default('there')) }}, use {{ code }}.\"\n",
    "promo_push",
    "promo_push",
)
_FIRST_NAMES = st.one_of(st.none(), st.sampled_from(["Ann", " pad ", "%%notifyctl:t:first_name%%", "", 7, 2.5]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from([{"discount": 10, "code": "W10", "first_name": "F"}, {"discount": 10, "code": "W10"}]),
       st.lists(st.tuples(st.booleans(), _FIRST_NAMES), min_size=2, max_size=8))  # fmt: skip
def test_a_shared_push_rendering_is_each_recipients_rendering(
    ctx: Context, data: dict[str, Any], recipients: list[tuple[bool, Any]]
) -> None:
    """A batch sharing one data, a push that prints a user field only as a fallback: where the data
    has the field, the batch's one rendering (no token in it) goes to every recipient who has the
    field, whatever their order; where it has not, each recipient's copy is filled in. Either way
    every recipient gets exactly what Jinja renders for them."""
    renderer = Renderer(Runtime(ctx, "w-push-tokens"))
    key = json.dumps(data)
    notes = [_Note(f"n{i}", f"u{i}", "t", "promo_push", "marketing", "low", None, ["push"], data, key)
             for i in range(len(recipients))]  # fmt: skip
    renderer.loaded(notes)
    renderer.templates["promo_push"] = _PUSH_PROMO
    for n, (has, name) in zip(notes, recipients, strict=True):
        attributes = {"first_name": name} if has else {}
        user = _User(n.recipient_id, None, None, "UTC", "en", False, attributes)
        want = _PUSH_PROMO.render("push", {**data, "user": user_vars(user)})  # type: ignore[arg-type]
        got = renderer.render(n, "push", user)
        assert isinstance(got, dict)
        pv = renderer.probed.get((n.id, "push"))
        if pv is not None:
            got = {part: _fill(piece, pv[1], tokens) for part, piece, tokens in renderer.fill_plan(pv)}
        assert got == want, (data, attributes)
