"""Issue 15: emails whose bodies differ per recipient are one SendGrid request — the bodies' shared
skeleton as the content, each recipient's own parts as their personalization's substitutions —
and each recipient, as the SendGrid sandbox rebuilds their copy (substitutions applied as
SendGrid does), gets exactly what Jinja renders for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from notifyctl.settings import Settings
from notifyctl.template_store import TemplateStore
from sandboxes.sendgrid import DEFAULT_API_KEY, SendgridSandbox
from tests.bulk_email import TEXT, html, message, recipients
from worker.providers import sendgrid
from worker.providers.base import Sent

FROM = "notifications@example.com"
SHIPPED = Path(__file__).resolve().parents[1] / "notifyctl" / "templates"

HTML = html("<p>Footer shared by everyone.</p>\n")


@pytest.fixture(scope="module")
def sandbox():
    sb = SendgridSandbox(api_key=DEFAULT_API_KEY).start()
    yield sb
    sb.stop()


@pytest.fixture(scope="module")
def provider(sandbox, tmp_path_factory):
    opts = {"api_key": DEFAULT_API_KEY, "base_url": sandbox.url}
    p = sendgrid.Provider(
        Settings(home=tmp_path_factory.mktemp("sg"), email_from=FROM, provider_options={"sendgrid": opts})
    )
    yield p
    p.close()


def send_and_rebuild(sandbox: SendgridSandbox, provider: Any, contents: list[dict[str, str]]) -> dict[str, Any]:
    sandbox.recorder.clear()
    before = len(sandbox.accepted_requests)
    out = provider.send([message(i, c) for i, c in enumerate(contents)])
    assert all(isinstance(o, Sent) for o in out), out
    got = {m["to"]: m for m in sandbox.recorder.all()}
    for i, c in enumerate(contents):
        mail = got[f"user{i}@example.org"]
        assert mail["subject"] == c["subject"]
        want = {"text/plain": c.get("text"), "text/html": c.get("html")}
        assert mail["content"] == {k: v for k, v in want.items() if v}
    return {"requests": sandbox.accepted_requests[before:]}


recipient = recipients("ab <>&\"'é€\n[%sg0]{}", max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(recipient, min_size=2, max_size=25))
def test_every_recipient_gets_what_jinja_renders(sandbox, provider, people: list[dict[str, Any]]) -> None:
    contents = [
        {"subject": f"Hello {p['name'][:3] or 'you'}", "text": TEXT.render(p), "html": HTML.render(p)} for p in people
    ]
    if len(people) % 3 == 0:  # bodies without an html part are never cut with those that have one
        for c in contents[::2]:
            del c["html"]
    result = send_and_rebuild(sandbox, provider, contents)
    # One request per set of parts, except for bodies whose own text holds a key's opening (sent
    # as they are).
    plain = [c for c in contents if not any(sendgrid.KEY_OPEN in v for v in c.values())]
    if len(plain) == len(contents):
        kinds: dict[tuple[str, ...], int] = {}
        for c in contents:
            kinds[tuple(sorted(c))] = kinds.get(tuple(sorted(c)), 0) + 1
        assert sorted(result["requests"]) == sorted(kinds.values())


@pytest.mark.parametrize("template_id", sorted(p.stem for p in SHIPPED.glob("*.toml")))
def test_every_shipped_template_is_one_request_and_exact(sandbox, provider, template_id: str) -> None:
    template = TemplateStore([SHIPPED]).get(template_id)
    if "email" not in template.parts:
        pytest.skip(f"{template_id} has no email")
    sample = {k: v for k, v in template.sample.items() if k != "user"}
    contents = []
    for i in range(30):
        data = {
            k: (f"{v}-{i}<&>" if isinstance(v, str) else v + i if isinstance(v, int) else v) for k, v in sample.items()
        }
        data["first_name"] = f"Ann {i} & <Co>" if i % 3 else ""
        data["user"] = {"first_name": f"U{i}", "email": f"user{i}@example.org"}
        contents.append(template.render("email", data))
    result = send_and_rebuild(sandbox, provider, contents)
    assert result["requests"] == [30]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from("ab\n\r[%sg1]é"), max_size=30), min_size=1, max_size=8))
def test_skeleton_rebuilds_each_body(bodies: list[str]) -> None:
    skel, keys, values = sendgrid.skeleton(bodies)
    for body, own in zip(bodies, values, strict=True):
        if sendgrid.KEY_OPEN in body:
            continue  # such bodies never go through a skeleton (the provider sends them as they are)
        rebuilt = skel
        for key, value in zip(keys, own, strict=True):
            rebuilt = rebuilt.replace(key, value)
        if not any(sendgrid.KEY_OPEN in b for b in bodies):
            assert rebuilt == body


def test_a_body_too_big_for_substitutions_goes_in_a_smaller_group(sandbox, provider) -> None:
    big = "x" * 12_000
    contents = [{"subject": "s", "text": f"line\n{i}\nshared"} for i in range(5)]
    contents += [{"subject": "s", "text": f"line\n{big}{i}\nshared"} for i in range(2)]  # too big with the 5
    contents += [{"subject": "s", "text": f"line\n{big}\n{big}\nshared\nmore"}]  # too big with anyone
    before = provider.fallbacks
    result = send_and_rebuild(sandbox, provider, contents)
    assert sorted(result["requests"]) == [1, 2, 5]  # the two big ones share all but their last character
    assert provider.fallbacks - before == 3


def test_send_of_whole_planned_groups_makes_exactly_those_requests(sandbox, provider) -> None:
    """``requests`` is the unit of the pace (``notifyctl.pacing``): sending a run of whole groups it
    planned makes exactly those requests, with the skeletons it worked out."""
    big = "y" * 12_000
    contents = [{"subject": "s", "text": f"Hi {i}\nshared"} for i in range(6)]
    contents += [{"subject": "s", "text": f"Hi {big}{i}\nshared\nmore"} for i in range(2)]
    msgs = [message(i, c) for i, c in enumerate(contents)]
    groups = provider.requests(msgs)
    assert sorted(len(g) for g in groups) == [2, 6]
    for group in groups:  # as the pace lets them go, one group at a time
        sandbox.recorder.clear()
        before = len(sandbox.accepted_requests)
        out = provider.send([msgs[i] for i in group])
        assert all(isinstance(o, Sent) for o in out)
        assert sandbox.accepted_requests[before:] == [len(group)]
        got = {m["to"]: m["content"]["text/plain"] for m in sandbox.recorder.all()}
        assert got == {msgs[i].address: contents[i]["text"] for i in group}


def test_values_too_big_for_substitutions_go_alone_as_their_copy(sandbox, provider) -> None:
    """A body the pipeline cut already (``Message.shared``, each one's values in ``personal``) is one
    request; a recipient whose values would pass SendGrid's 10,000 bytes goes alone, with their copy."""
    from dataclasses import replace

    shared = {"subject": "s", "text": "Hi %%v%%, shared"}
    names = ["Ann", "z" * 11_000, "Bob"]
    msgs = [
        replace(message(i, {"subject": "s", "text": f"Hi {v}, shared"}), shared=shared, personal={"%%v%%": v})
        for i, v in enumerate(names)
    ]
    sandbox.recorder.clear()
    before, fallbacks = len(sandbox.accepted_requests), provider.fallbacks
    assert sorted(len(g) for g in provider.requests(msgs)) == [1, 2]  # (as the pace asks first)
    assert all(isinstance(o, Sent) for o in provider.send(msgs))
    assert sorted(sandbox.accepted_requests[before:]) == [1, 2]
    assert provider.fallbacks - fallbacks == 1  # counted once: send uses what requests worked out
    got = {m["to"]: m["content"]["text/plain"] for m in sandbox.recorder.all()}
    assert got == {f"user{i}@example.org": f"Hi {v}, shared" for i, v in enumerate(names)}
