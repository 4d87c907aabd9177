"""Templates: null is missing; rendering is bounded in time and size (hostile templates end in a
one-line error naming the template, channel and part, in a child process whose address space is
capped, so that a regression cannot take the machine down); ordinary templates render exactly as
Jinja renders them; the data a template needs; the CLI's list/show/render/validate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from jinja2 import StrictUndefined
from jinja2.sandbox import SandboxedEnvironment
from typer.testing import CliRunner

from notifyctl.cli.main import app
from notifyctl.context import Context
from notifyctl.errors import TemplateError
from notifyctl.settings import Settings
from notifyctl.template_store import SHIPPED, TemplateStore
from notifyctl.templates import Template, parse_template
from tests.capped import CappedRenderer
from tests.conftest import cli_env, run_cli
from tests.fuzz_util import snapshot
from tests.util import ApiServer, seed

runner = CliRunner()


def sms(src: str, tid: str = "t") -> Template:
    return Template(id=tid, category="transactional", priority="normal", parts={"sms": {"text": src}})


def render_sms(src: str, data: dict[str, Any]) -> str:
    return sms(src).render("sms", data)["text"]


def invoke(settings: Settings, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), env=cli_env(settings))


# ------------------------------------------------------------------------------------------- null is missing


@pytest.mark.parametrize("null", [None, math.nan, math.inf, -math.inf])
def test_a_null_variable_is_missing_when_printed(null: float | None) -> None:
    """JSON null (and NaN/Infinity, which the JSON columns store as null) printed is an error
    exactly like a missing variable, never "None" or "nan" in an SMS."""
    t = parse_template(SHIPPED / "otp_code.toml")
    with pytest.raises(TemplateError) as exc:
        t.render("sms", {"code": null, "minutes": 10})
    assert str(exc.value) == "template 'otp_code' sms.text: data is missing variable 'code'"
    with pytest.raises(TemplateError) as missing:
        t.render("sms", {"minutes": 10})
    assert str(missing.value) == str(exc.value)
    # nested: a null field or item is missing too
    for src, data, what in [
        ("{{ user.first_name }}", {"user": {"first_name": null}}, "field 'first_name'"),
        ("{{ d['k'] }}", {"d": {"k": null}}, "field 'k'"),
        ("{{ items[0] }}", {"items": [null]}, "no element 0"),
        ("{% for x in items %}{{ x }}{% endfor %}", {"items": ["a", null]}, "a loop item is null"),
        ("{% for k, v in d.items() %}{{ v }}{% endfor %}", {"d": {"k": null}}, "null"),
        ("{% macro m(a) %}{{ a }}{% endmacro %}{{ m(x) }}", {"x": null}, "variable 'x'"),
        ("{{ d.get('k') }}", {"d": {"k": null}}, "get() returned null"),
        ("{{ 'Hi ' ~ x }}", {"x": null}, "variable 'x'"),
        ("{{ '%s' % x }}", {"x": null}, "variable 'x'"),
    ]:
        with pytest.raises(TemplateError, match="data is missing") as e:
            render_sms(src, data)
        assert what in str(e.value), (src, str(e.value))


@pytest.mark.parametrize("null", [None, math.nan])
def test_a_null_variable_is_false_in_a_test_and_falls_back_to_its_default(null: float | None) -> None:
    data = {"x": null, "user": {"first_name": null}}
    assert render_sms("{% if x %}yes{% else %}no{% endif %}", data) == "no"
    assert render_sms("{{ x | default('fallback') }}", data) == "fallback"
    assert render_sms("{{ x is none }} {{ x is defined }} {{ x is not none }}", data) == "True False False"
    assert render_sms("{{ x or 'or' }}", data) == "or"
    greet = "Hi {{ first_name | default(user.first_name | default('there')) }}"
    assert render_sms(greet, {"first_name": null, "user": {"first_name": null}}) == "Hi there"
    assert render_sms(greet, {"first_name": null, "user": {"first_name": "Ann"}}) == "Hi Ann"
    assert render_sms(greet, {"first_name": "Row", "user": {"first_name": "Ann"}}) == "Hi Row"
    assert render_sms(greet, {"user": {}}) == "Hi there"
    # a missing variable in a test is still an error (StrictUndefined): only null is falsy
    with pytest.raises(TemplateError, match="data is missing variable 'y'"):
        render_sms("{% if y %}yes{% endif %}", {})


def test_null_template_data_is_refused_at_intake_cli_and_http(ctx: Context, settings: Settings) -> None:
    """`send` with ``"code": null`` is exit 2 with one line (it was sent as "None is your sign-in
    code"); over HTTP a 422; nothing is queued either way."""
    seed(ctx)
    before = snapshot(ctx)
    r = invoke(settings, "send", "alice", "-t", "otp_code", "-c", "sms", "--data-json", '{"code": null, "minutes": 5}')
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == "error: template 'otp_code' sms.text: data is missing variable 'code'"
    from notifyctl.api.auth import create_key

    key = create_key(ctx, "tests").key
    import httpx

    body = {"recipient_id": "alice", "template_id": "otp_code", "channels": ["sms"], "data": {"code": None}}
    with ApiServer(ctx) as server, httpx.Client(base_url=server.url, timeout=20) as c:
        resp = c.post("/v1/notify", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 422 and resp.json() == {
        "error": "template 'otp_code' sms.text: data is missing variable 'code'"
    }
    assert snapshot(ctx) == before


# -------------------------------------------------------------------------------------------- the limits

# (source, what the one-line error says); each would take gigabytes or hang without the limits
HOSTILE = [
    ("{{ 'a' * 10**9 }}", "* would make a value longer than 1,000,000"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "too much work"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "too much work"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "macros nested more than 50 deep"),
    (
        "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% else %}x{% endif %}{% endmacro %}{{ f(40) }}",
        "too much work",
    ),
    ("{{ range(100000) | join('x' * 100000) }}", "join would make a string longer"),
    ("{{ '%999999999d' | format(1) }}", "format: a width or precision of 999999999"),
    ("{{ '%999999999d' % 1 }}", "%: a width or precision of 999999999"),
    ("{{ '%.999999999f' % 1 }}", "%: a width or precision of 999999999"),
    ("{{ '%*d' % (999999999, 1) }}", "a width or precision of 999999999"),
    ("{{ '{:>999999999}'.format(1) }}", "format: a width or precision of 999999999"),
    ("{{ '{:>{w}}'.format(1, w=999999999) }}", "a width or precision of 999999999"),
    ("{{ '{a:>999999999}'.format_map({'a': 1}) }}", "a width or precision of 999999999"),
    ("{{ '{:>{}}'.format('x', ('2147483648' | e)) }}", "format: a width or precision of 2147483648"),
    ("{{ lipsum(n=10**7) }}", "lipsum"),
    ("{{ 'x' | center(999999999) }}", "center: a width of 999999999"),
    ("{{ 'x'.ljust(999999999) }}", "ljust(): a width of 999999999"),
    ("{{ 'x'.zfill(999999999) }}", "zfill(): a width of 999999999"),
    ("{{ lipsum(n=1).center(999999999) }}", "center(): a width of 999999999"),  # Markup's method
    ("{{ ('x' | e).ljust(2147483648) }}", "ljust(): a width of 2147483648"),
    ("{{ ('\t' * 1000).expandtabs(999999) }}", "expandtabs() would make"),
    ("{{ (1).to_bytes(999999999, 'big') }}", "to_bytes(): a length of 999999999"),
    ("{{ ('a' * 100000).replace('a', 'b' * 100) }}", "replace() would make"),
    ("{{ ('a' * 100000) | replace('', 'b' * 100) }}", "replace would make"),
    ("{{ ('a' * 100000).translate({97: 'b' * 1000}) }}", "translate() would make"),
    ("{{ ('a\n' * 400000) | indent('x' * 100) }}", "indent would make"),
    ("{{ ('a ' * 100000) | wordwrap(1, wrapstring='x' * 1000) }}", "wordwrap would make"),
    ("{{ [1] | batch(999999999, 'x') | list }}", "batch: a size of 999999999"),
    ("{{ [1] | slice(999999999) | list }}", "slice: a count of 999999999"),
    ("{{ [1, 'a'] | slice(999999) | join }}", "slice: a count of 999999 is over the limit of 100,000"),
    ("{{ [[1]] | tojson(indent=999999999) }}", "tojson: an indent of 999999999"),
    ("{{ ('a.b ' * 100000) | urlize(target='x' * 1000) }}", "urlize would make"),
    ("{{ 9 ** (9 ** 9) }}", "** would make an integer longer"),
    (
        "{% set ns = namespace(n=3) %}{% for i in range(100) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
        "integer longer",
    ),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "~ would make"),
    ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "+ would make"),
    ("{% set a = 'x' * 999999 %}{% set b = a ~ a %}{{ b | length }}", "~ would make"),
    ("{% set ns = namespace(t=1) %}{% for i in range(60) %}{% set ns.t = (ns.t, ns.t) %}{% endfor %}", "literal"),
    ("{% set a = ['x' * 1000] * 600 %}{% set b = [a, a] %}{{ b | string }}", "literal holds more than"),
    ("{{ ([1] * 100000) * 100000 }}", "* would make a value longer"),
    ("{{ {}.fromkeys(range(100000), 'x' * 1000) }}", "fromkeys() makes a value longer"),
    ("{% for i in range(100000) %}{{ 'x' * 999999 }}{% endfor %}", "prints more than 20,000,000 characters"),
    ("{% for i in range(100000) %}{{ 'x' | center(999999) }}{% endfor %}", "prints more than 20,000,000"),
    ("{% set s = 'x' * 999999 %}" + "{{ s }}" * 30, "prints more than 20,000,000 characters"),
    ("{% set s = '&' * 999999 %}{{ s | forceescape | forceescape }}", "forceescape filter makes a string longer"),
    ("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "too much work"),
    (
        "{% for x in range(100000) recursive %}{% if loop.depth < 3 %}{{ loop(range(100000)) }}{% endif %}{% endfor %}",
        "too much work",
    ),
    ("{% macro m() %}{{ caller() }}{{ caller() }}{% endmacro %}{% call m() %}{{ 'x' * 999999 }}{% endcall %}", "m()"),
    ("{{ 'x' * 999999 }}{{ 'y' * 999999 }}", "renders 1,999,998 characters, over the limit of 1,000,000"),
    ("{% for i in range(200000) %}{% endfor %}", "Range too big"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "nested too deeply"),
]


def test_hostile_templates_end_in_one_line_errors_within_bounds() -> None:
    """Each shape that took gigabytes (``'a' * 10**9``: 2 GB then a MemoryError traceback) or hung
    (two nested ``range(100000)``) is a one-line TemplateError naming the template, channel and
    part; none of them grows the process past a few tens of megabytes."""
    with CappedRenderer() as child:
        results = [child.render(src) for src, _ in HOSTILE]
        for i, (src, want) in enumerate(HOSTILE):
            # work is bounded by a count and by time: on a loaded machine the clock may stop a render
            # before the bound under test does; rendered again (at most 3 times) the bound must show
            for _ in range(3):
                if want == "too much work" or "took longer than 1 s" not in (results[i]["error"] or ""):
                    break
                results[i] = child.render(src)
    for (src, want), res in zip(HOSTILE, results, strict=True):
        err = res["error"]
        assert err is not None, f"rendered: {src[:80]}"
        assert err.startswith("template 'bomb' sms.text: ") and "\n" not in err, err
        # work is bounded by a count and by time: on a loaded machine the clock may stop it first
        stopped = want in err or (want == "too much work" and "took longer than 1 s" in err)
        assert stopped and "out of memory" not in err, (src[:80], err)
    assert results[-1]["max_rss_mb"] < 300, results[-1]["max_rss_mb"]


ORDINARY = [
    "Hi {{ name }}, order {{ order.id }} ({{ order['items'] | length }} items) ships {{ when | default('soon') }}.",
    "{% for i in order['items'] %}{{ loop.index }}. {{ i.name | title }} x{{ i.qty }}"
    "{% if not loop.last %}, {% endif %}{% endfor %}",
    "{% macro money(v) %}${{ '%.2f' | format(v) }}{% endmacro %}Total {{ money(total) }} "
    "(tax {{ money(total * 0.2) }}), {{ (total * 100) | int }} cents",
    "{{ '{:>8}|{:<6}|'.format(name, 'x') }}{{ name | center(12) }}|{{ tags | join(', ') }}|{{ name ~ '!' * 3 }}",
    "{% set ns = namespace(n=0) %}{% for t in tags %}{% set ns.n = ns.n + t | length %}{% endfor %}{{ ns.n }} "
    "{{ tags | map('upper') | list }} {{ {'a': 1, 'b': [name]} }} {{ (name, 2) }} {{ [1, 2] + [3] }}",
    "{{ name | replace('a', 'A') }} {{ long | wordwrap(20) }} {{ long | truncate(30) }} {{ name | indent(2) }}",
    "{{ 2 ** 10 }} {{ 7 * 6 }} {{ 'ab' * 3 }} {{ 10 % 3 }} {{ 'x=%s y=%d' % (name, 5) }} {{ order | tojson }}",
]
ORDINARY_DATA = {
    "name": "Ada Lovelace",
    "order": {"id": "ORD-9", "items": [{"name": "book", "qty": 2}, {"name": "lamp", "qty": 1}]},
    "total": 42.5,
    "tags": ["a", "bb", "ccc"],
    "long": "the quick brown fox jumps over the lazy dog " * 3,
}


@pytest.mark.parametrize("src", ORDINARY)
def test_ordinary_templates_render_exactly_as_jinja_renders_them(src: str) -> None:
    plain = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
    assert render_sms(src, ORDINARY_DATA) == plain.from_string(src).render(ORDINARY_DATA).strip()


def test_a_hung_template_fails_send_and_templates_render_with_one_line(ctx: Context, settings: Settings) -> None:
    """Intake renders synchronously: two nested range(100000) loops hung `send` and `templates
    render` (as subprocesses here, with a timeout: on main they time out)."""
    seed(ctx)
    tdir = settings.home / "templates"
    tdir.mkdir(mode=0o700)  # private, as notifyctl keeps its home
    hang = tdir / "hang.toml"
    hang.write_text(
        'category = "transactional"\n[sms]\n'
        'text = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ code }}"\n'
    )
    hang.chmod(0o600)
    before = snapshot(ctx)
    r = run_cli(settings, "send", "alice", "-t", "hang", "-c", "sms", "-d", "code=1", timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (
        "error: template 'hang' sms.text: too much work: more than 100,000 loop iterations and calls"
    )
    assert snapshot(ctx) == before
    r = run_cli(settings, "templates", "render", "hang", "--data", '{"code": 1}', timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "too much work" in r.stderr, r.stderr


# -------------------------------------------------------------------------------- what a template needs


def test_weekly_promo_needs_discount_and_code_and_greets_with_a_fallback() -> None:
    t = parse_template(SHIPPED / "weekly_promo.toml")
    needs = {n.name: n.required for n in t.needs()}
    assert needs == {"code": True, "discount": True, "first_name": False}
    assert t.user_fields() == ["first_name"]
    data = {"discount": 20, "code": "WEEK20"}
    assert t.render("push", {**data, "user": {"first_name": "Ann"}})["body"] == "Hi Ann, use WEEK20 for 20% off."
    assert t.render("push", {**data, "user": {"first_name": None}})["body"] == "Hi there, use WEEK20 for 20% off."
    assert t.render("email", {**data, "user": {}})["subject"] == "Hello, 20% off everything this week"
    assert t.render("email", {**data, "first_name": "Row", "user": {}})["subject"].startswith("Row, ")
    # the worker renders it once per batch with a token for the recipient's first_name
    assert t.direct_user_fields("email") == {"first_name"}
    for src, fields in [
        ("{{ user.x | default('y') }}", {"x"}),
        ("{{ a | default(user.x) }} {{ user.y }}", {"x", "y"}),
        ("{{ user.x | default('y', true) }}", None),  # a token is truthy where '' is not
        ("{{ user.x | default(user) }}", None),
        ("{{ user.x | upper }}", None),
    ]:
        assert sms(src).direct_user_fields("sms") == (frozenset(fields) if fields is not None else None), src


def test_every_shipped_template_renders_its_sample() -> None:
    for path in SHIPPED.glob("*.toml"):
        t = parse_template(path)
        for c in t.channels:
            assert all(t.render(c, t.preview_data()).values()), (t.id, c)


def test_templates_cli_show_validate_and_a_broken_file(settings: Settings) -> None:
    r = invoke(settings, "templates", "show", "weekly_promo", "--json")
    shown = json.loads(r.stdout)
    assert shown["data"] == [
        {"name": "code", "required": True, "secret": False, "channels": ["push", "email", "sms"], "sample": "WEEK20"},
        {"name": "discount", "required": True, "secret": False, "channels": ["push", "email", "sms"], "sample": 20},
        {"name": "first_name", "required": False, "secret": False, "channels": ["push", "email"], "sample": None},
    ]
    assert shown["user_fields"] == ["first_name"]
    r = invoke(settings, "templates", "show", "weekly_promo")
    assert r.exit_code == 0 and "no (has a fallback)" in r.stdout and "user.first_name" in r.stdout
    otp = json.loads(invoke(settings, "templates", "show", "otp_code", "--json").stdout)
    assert [d["name"] for d in otp["data"] if d["secret"]] == ["code"]
    assert "never shown" in invoke(settings, "templates", "show", "otp_code").stdout
    r = invoke(settings, "templates", "validate", "--json")
    assert r.exit_code == 0 and all(x["ok"] for x in json.loads(r.stdout))

    tdir = settings.home / "templates"
    tdir.mkdir()
    (tdir / "broken.toml").write_text('category = "transactional"\n[sms\ntext = "x"\n')
    (tdir / "slow.toml").write_text('category = "alerts"\n[sms]\ntext = "{{ \'a\' * 10**9 }}"\n')
    r = invoke(settings, "templates", "list", "--json")
    assert r.exit_code == 1
    listed = {t["id"]: t for t in json.loads(r.stdout)}
    assert {"weekly_promo", "otp_code", "slow"} <= set(listed) and listed["weekly_promo"]["error"] is None
    assert listed["broken"]["source"] == str(tdir / "broken.toml")
    assert listed["broken"]["error"].startswith(f"{tdir / 'broken.toml'}: not valid TOML: ")
    r = invoke(settings, "templates", "list")
    assert r.exit_code == 1 and "weekly_promo" in r.stdout
    assert r.stderr.splitlines() == [f"error: {listed['broken']['error']}"]
    r = invoke(settings, "templates", "validate", "--json")
    assert r.exit_code == 1
    results = {x["id"]: x for x in json.loads(r.stdout)}
    assert results["otp_code"]["ok"] and not results["broken"]["ok"]
    assert (
        results["slow"]["error"]
        == "template 'slow' sms.text: * would make a value longer than 1,000,000 characters or items"
    )
    r = invoke(settings, "templates", "validate")
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 2 and "ok     otp_code" in r.stdout
    r = invoke(settings, "templates", "show", "nope")
    assert r.exit_code == 4 and "no template 'nope'" in r.stderr


def test_store_lists_good_templates_beside_a_broken_one(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("category = [")
    (tmp_path / "sample.toml").write_text('category = "alerts"\nsample = 3\n[sms]\ntext = "x"\n')
    loaded = {x.id: x for x in TemplateStore([tmp_path, SHIPPED]).load_all()}
    assert loaded["otp_code"].template is not None and loaded["bad"].template is None
    assert loaded["bad"].error is not None and "not valid TOML" in loaded["bad"].error
    assert loaded["sample"].error == f"{tmp_path / 'sample.toml'}: sample must be a table ([sample]), not a value"
