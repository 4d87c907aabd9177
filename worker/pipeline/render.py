"""Stage 3, render: each notification's content per channel, once per batch where it can be shared.

``Renderer`` holds one batch's caches: templates, renderings per (notification, channel), renders
that do not read ``user`` per data, and — for a channel that only prints the recipient's own
fields (``{{ user.first_name }}``) — the batch's rendering with tokens (``_UserProbe``) and each
recipient's values for them (``_token_values``), put in when the message is built (``send.claim``).
For email, ``_EmailPlan`` works out once per body what every recipient shares (footer, headers,
the body with tokens) and ``apply`` does what differs per recipient.

One module: the caches, the per-recipient tokens and the email plan are one batch's rendering
state, read together by ``send`` for every message; split apart they would pass that state around.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import markupsafe
import orjson

from notifyctl.errors import TemplateError
from notifyctl.inbound import pixel_maker
from notifyctl.intake import user_vars
from notifyctl.secretdata import ERASED_KEY, erased_fields, erased_reason
from notifyctl.templates import Template
from notifyctl.unsubscribe import link_maker
from worker.pipeline.batch import _D, _Note
from worker.pipeline.runtime import Runtime
from worker.providers.base import Message


class Renderer:
    """One batch's renderings (see the module docstring). Its dicts live as long as the batch: the
    ``id()`` of a rendering is a key of ``fill_plan`` and ``email_plan``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.templates: dict[str, Template | TemplateError] = {}
        self.rendered: dict[tuple[str, str], dict[str, str] | str] = {}  # (notification id, channel) → content or error
        self.by_data: dict[tuple[str, str, str], dict[str, str] | str] = {}  # renders that do not read `user`
        # (notification id, channel) → (the batch's rendering with tokens, this recipient's token values)
        self.probed: dict[tuple[str, str], tuple[dict[str, str], dict[str, str]]] = {}
        self.probes: dict[tuple[str, str, str], dict[str, str] | None] = {}
        # of those, the renderings with no token (a channel with no HTML part): no user value printed
        self.bare: dict[tuple[str, str, str], dict[str, str]] = {}
        self.data_probes: dict[tuple[str, str, tuple[str, ...], bytes], dict[str, str] | None] = {}
        self.data_shapes: dict[tuple[str, str], tuple[frozenset[str], frozenset[str] | None, bool]] = {}
        self.data_tokens: dict[str, tuple[str, str]] = {}  # data name → its (text, HTML) tokens
        self.shared_data: Counter[str] = Counter()  # notifications of the batch per data (filled once loaded)
        self.templates_in_batch: Counter[str] = Counter()  # notifications of the batch per template
        self.fills: dict[int, list[tuple[str, str, tuple[str, ...]]]] = {}
        self.plans: dict[tuple[int, bool], _EmailPlan] = {}
        self.footers: dict[bool, tuple[bool, bool, dict[str, str]]] = {}

    def loaded(self, notifications: list[_Note]) -> None:
        """The batch is loaded: count the notifications sharing each data."""
        self.shared_data.update(n.data_key for n in notifications)
        self.templates_in_batch.update(n.template_id for n in notifications)

    def template_for(self, tid: str) -> Template | TemplateError:
        t = self.templates.get(tid)
        if t is None:
            try:
                t = self.rt.ctx.templates.get(tid)
            except TemplateError as exc:
                t = exc
            self.templates[tid] = t
        return t

    def secret_of(self, tid: str) -> frozenset[str]:
        t = self.template_for(tid)
        return frozenset() if isinstance(t, TemplateError) else t.secret

    def render(self, n: Any, channel: str, user: Any) -> dict[str, str] | str:
        key = (n.id, channel)
        out = self.rendered.get(key)
        if out is None:
            t = self.template_for(n.template_id)
            if isinstance(t, TemplateError):
                out = f"template_error: {t}"
            elif t.secret and ERASED_KEY in n.data:  # a DLQ replay after the code was erased
                out = erased_reason(t.id, erased_fields(n.data))
            else:
                # A channel that never reads `user` gives the same result for the same data: a
                # campaign batch (one data for all) renders it once.
                names = t.variables(channel)
                shared = None
                if names is not None and "user" not in names:
                    shared = (n.template_id, channel, n.data_key)
                    out = self.by_data.get(shared)
                elif user is not None and self.shared_data[n.data_key] > 1:
                    # A channel that only prints the recipient's variables ({{ user.first_name }}):
                    # the batch's rendering with tokens, with this recipient's values put in (for
                    # data shared by several notifications of the batch: else one render is cheaper).
                    fields = t.direct_user_fields(channel)
                    bare = self.bare.get((n.template_id, channel, n.data_key))
                    if bare is not None:
                        # (push, SMS) no user value is printed for this data (a campaign's
                        # `first_name | default(user.first_name)`): every recipient who has the
                        # fields gets the batch's rendering as it is, no copy of their own
                        if _has_token_values(fields, user):
                            out = bare
                    else:
                        html = "html" in t.parts.get(channel, ())  # (an HTML part: email)
                        values = _token_values(fields, user, html)
                        parts = self.probe(n, channel, t) if values is not None else None
                        if parts is not None:
                            out = parts  # with tokens: the recipient's copy is made when sending
                            if html or any(tokens for _p, _v, tokens in self.fill_plan((parts, values))):  # type: ignore[arg-type]
                                self.probed[key] = (parts, values)  # type: ignore[assignment]
                            else:  # (the same for every recipient with values: their names are the fields')
                                self.bare[(n.template_id, channel, n.data_key)] = parts
                if (
                    out is None
                    and user is not None
                    and self.shared_data[n.data_key] == 1
                    and self.templates_in_batch[n.template_id] > 1
                ):
                    # Data of its own (a segment's columns): the batch's rendering with a token for each
                    # value the channel only prints, once per template and remaining data
                    pv = self.data_probe(n, channel, t, user)
                    if pv is not None:
                        out = pv[0]
                        self.probed[key] = pv
                if out is None:
                    try:
                        out = t.render(channel, {**n.data, "user": user_vars(user)})
                    except TemplateError as exc:
                        out = f"template_error: {exc}"
                    if shared is not None:
                        self.by_data[shared] = out
            self.rendered[key] = out
        return out

    def probe(self, n: Any, channel: str, t: Template) -> dict[str, str] | None:
        """The channel rendered with tokens for the recipient's variables (``_UserProbe``), once
        per template and data: what a provider with substitutions sends to a whole batch."""
        probes = self.probes
        key = (n.template_id, channel, n.data_key)
        if key not in probes:
            if TOKEN_PREFIX in n.data_key or any(TOKEN_PREFIX in src for src in t.parts[channel].values()):
                probes[key] = None  # text that looks like a token: no substitutions for this one
                return None
            try:
                parts = t.render(channel, {**n.data, "user": _UserProbe("t")})
                if "html" in parts:
                    parts["html"] = t.render(channel, {**n.data, "user": _UserProbe("h")})["html"]
                probes[key] = parts
            except TemplateError:
                probes[key] = None
        return probes[key]

    def data_probe(self, n: Any, channel: str, t: Template, user: Any) -> tuple[dict[str, str], dict[str, str]] | None:
        """(the channel rendered with a token for each of ``n``'s data values that it only prints
        — ``Template.direct_data_names`` — and for the user fields it prints, this recipient's
        values for those tokens), or None when nothing is left to share or a value cannot stand
        in as a token (rendered the ordinary way). One rendering per template, channel, the
        names turned into tokens, and the rest of the data."""
        shape = self.data_shapes.get((t.id, channel))
        if shape is None:
            shape = self.data_shapes[(t.id, channel)] = _data_shape(t, channel)
        direct, ufields, html = shape
        if not direct or TOKEN_PREFIX in n.data_key:  # (data that looks like a token: as it is)
            return None
        tokenized: dict[str, str] = {}
        rest: dict[str, Any] = {}
        for k, v in n.data.items():
            if k in direct:  # (a string: _token_text's own test without the call, the usual value)
                if type(v) is str and len(v) <= _MAX_TOKEN_VALUE and TOKEN_PREFIX not in v and v == v.strip():
                    if v or not html:  # (an empty one in an email: see _token_text)
                        tokenized[k] = v
                        continue
                if (text := _token_text(v)) is not None and (text or not html):  # (see _token_text)
                    tokenized[k] = text
                    continue
            rest[k] = v
        if not tokenized or ufields is None:
            return None
        values = _token_values(ufields, user, html) if ufields else {}
        if values is None:
            return None
        try:
            key = (t.id, channel, tuple(tokenized), orjson.dumps(rest, option=orjson.OPT_SORT_KEYS) if rest else b"{}")
        except TypeError:  # (what JSON did not give: rendered the ordinary way)
            return None
        probes = self.data_probes
        if key in probes:
            parts = probes[key]
        else:
            parts = None
            if not any(TOKEN_PREFIX in src for src in t.parts[channel].values()):
                try:
                    data = {**rest, **{k: f"{TOKEN_PREFIX}dt:{k}%%" for k in tokenized}}
                    parts = t.render(channel, {**data, "user": _UserProbe("t")})
                    if "html" in parts:
                        data = {**rest, **{k: f"{TOKEN_PREFIX}dh:{k}%%" for k in tokenized}}
                        parts["html"] = t.render(channel, {**data, "user": _UserProbe("h")})["html"]
                except TemplateError:
                    parts = None
            probes[key] = parts
        if parts is None:
            return None
        names = self.data_tokens
        for k, text in tokenized.items():
            pair = names.get(k)
            if pair is None:
                pair = names[k] = (f"{TOKEN_PREFIX}dt:{k}%%", f"{TOKEN_PREFIX}dh:{k}%%")
            values[pair[0]] = text
            if html:  # (letters and digits: nothing to escape, the usual name or code)
                values[pair[1]] = text if text.isalnum() else _escaped(text, n.data[k])
        return parts, values

    def fill_plan(self, pv: tuple[dict[str, str], dict[str, str]]) -> list[tuple[str, str, tuple[str, ...]]]:
        """Per part of a rendering with tokens: (part, text, the tokens it holds), once per rendering
        (``pv[0]`` lives as long as the batch)."""
        plan = self.fills.get(id(pv[0]))
        if plan is None:
            plan = self.fills[id(pv[0])] = [(part, v, tuple(t for t in pv[1] if t in v)) for part, v in pv[0].items()]
        return plan

    def email_plan(self, content: dict[str, str], values: dict[str, str] | None, marketing: bool) -> _EmailPlan:
        """One plan per distinct body in the batch (``content`` objects live as long as the batch);
        ``values``: a recipient's token values, when ``content`` is a rendering with tokens."""
        key = (id(content), marketing)
        plan = self.plans.get(key)
        if plan is None:
            footer = self.footers.get(marketing)
            if footer is None:
                footer = self.footers[marketing] = _EmailPlan.footer(self.settings, marketing)
            plan = self.plans[key] = _EmailPlan(self.settings, content, tuple(values or ()), marketing, footer)
        return plan


# Tokens for what differs per recipient in an email (see Message.shared): the recipient's
# template variables (``%%notifyctl:t:first_name%%`` as text, ``h:`` as escaped HTML) and what the
# pipeline adds (unsubscribe link, open pixel).
TOKEN_PREFIX = "%%notifyctl:"
UNSUBSCRIBE_TEXT = TOKEN_PREFIX + "unsubscribe%%"
UNSUBSCRIBE_HTML = TOKEN_PREFIX + "unsubscribe_html%%"
OPEN_PIXEL = TOKEN_PREFIX + "open_pixel%%"
_FOOTER_TOKENS = (UNSUBSCRIBE_TEXT, UNSUBSCRIBE_HTML, OPEN_PIXEL)


class _UserProbe(dict):  # type: ignore[type-arg]
    """Stands in for ``user`` when a template is rendered once for a batch: any variable read from
    it (``user.first_name``, ``user["plan"]``) renders as a token. Used only for channels that do
    nothing else with ``user`` (``Template.direct_user_fields``; see ``_token_values``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __missing__(self, key: str) -> str:
        return f"{TOKEN_PREFIX}{self.kind}:{key}%%"


# a value put in place of a token: at most this long, so that a recipient's values stay well within
# a provider's substitutions (SendGrid: 10,000 bytes a recipient) and a rendering's size limit
_MAX_TOKEN_VALUE = 1000


def _token_text(v: Any) -> str | None:
    """What Jinja prints for a data value that a token may stand for (a string or a number; not
    null, not too long, no token look-alike, no edge whitespace a part's strip() could eat), else
    None. In an email (``html``) not an empty one either: beside a part's edge it would leave the
    whitespace next to it in what SendGrid's substitution gives, where rendering strips it."""
    t = type(v)
    if not (t is str or t is int or (t is float and math.isfinite(v))):
        return None
    text = str(v)
    if len(text) > _MAX_TOKEN_VALUE or TOKEN_PREFIX in text or text != text.strip():
        return None
    return text


def _data_shape(t: Template, channel: str) -> tuple[frozenset[str], frozenset[str] | None, bool]:
    """What ``Renderer.data_probe`` asks of a template's channel, once per batch: (the data names
    it only prints — empty when none, or when the template holds secrets —, the ``user`` fields it
    prints — empty when it reads no ``user``, None when it does more with ``user`` than print
    fields or a field's name could hold a token's text —, whether it has an HTML part)."""
    direct = frozenset() if t.secret else t.direct_data_names(channel)
    ufields: frozenset[str] | None = frozenset()
    if "user" in (t.variables(channel) or ()):
        ufields = t.direct_user_fields(channel)
        if ufields is not None and any("%" in f for f in ufields):
            ufields = None
    return direct, ufields, "html" in t.parts.get(channel, ())


def _escaped(text: str, value: Any) -> str:
    """``str(markupsafe.escape(value))`` (Jinja's HTML print) where ``text`` is ``str(value)``: ``text``
    itself for a string or number with nothing to escape (most names and codes), no ``Markup``."""
    t = type(value)
    if (t is str or t is int or t is float) and not (
        "&" in text or "<" in text or ">" in text or "'" in text or '"' in text
    ):
        return text
    return str(markupsafe.escape(value))


# ``intake.user_vars``' own keys, under the user's attributes (which win on the same name)
_USER_COLUMNS = frozenset(("id", "email", "locale", "timezone"))


def _user_field(user: Any, name: str) -> Any:
    """``user_vars(user).get(name)`` without making the dict (a recipient's few printed fields)."""
    attrs = user.attributes
    if name in attrs:
        return attrs[name]
    return getattr(user, name) if name in _USER_COLUMNS else None


def _token_text_of(user: Any, field: str) -> tuple[str, Any] | None:
    """(the text a token stands for, the value) of a recipient's field, or None when it cannot
    stand in (missing or null, a value that looks like a token or has edge whitespace)."""
    v = _user_field(user, field)
    if v is None or (type(v) is float and not math.isfinite(v)):
        return None  # missing or null (which templates treat as missing): rendered the ordinary way
    text = v if type(v) is str else str(v)
    if TOKEN_PREFIX in text or text != text.strip():
        # a value that looks like a token, or whose edge whitespace a part's strip() could eat
        return None
    return text, v


def _has_token_values(fields: frozenset[str] | None, user: Any) -> bool:
    """Whether ``_token_values(fields, user)`` gives values (not None), without making them."""
    if fields is None:
        return False
    for f in fields:
        if _token_text_of(user, f) is None:
            return False
    return True


def _token_values(fields: frozenset[str] | None, user: Any, html: bool = True) -> dict[str, str] | None:
    """A recipient's values for the tokens of ``_UserProbe`` (``t:`` as text, ``h:`` escaped for
    HTML: only with ``html``, the channel that has an HTML part), when the template only prints
    ``user`` fields (``Template.direct_user_fields``) and the recipient has them all; else None
    (rendered the ordinary way). Putting them in the probe's rendering and stripping each part is
    exactly what rendering gives: Jinja prints ``str(value)``, escaped in the HTML part."""
    if fields is None:
        return None
    values: dict[str, str] = {}
    for f in fields:
        tv = _token_text_of(user, f)
        if tv is None or (html and not tv[0]):
            # (an empty value in an email: beside a part's edge it would leave the whitespace next
            # to it in what SendGrid's substitution gives, where rendering strips it)
            return None
        text, v = tv
        values[f"{TOKEN_PREFIX}t:{f}%%"] = text
        if html:
            values[f"{TOKEN_PREFIX}h:{f}%%"] = _escaped(text, v)
    return values


class _EmailPlan:
    """What every recipient of one email body in a batch shares, worked out once: for marketing,
    RFC 8058 one-click unsubscribe headers and a footer (unsubscribe link, postal address —
    CAN-SPAM); the open-tracking pixel when a public URL is set; the body with tokens where each
    recipient's parts go (``Message.shared``). ``apply`` then does only what differs per
    recipient: the signed links, the token values, and the recipient's own copy of the body."""

    __slots__ = ("pieces", "shared", "tokens", "values", "unsub", "pixel", "substitute", "links", "full")

    def __init__(self, settings: Any, content: dict[str, str], tokens: tuple[str, ...], marketing: bool,
                 footer: tuple[bool, bool, dict[str, str]] | None = None) -> None:  # fmt: skip
        """``content``: the body, with ``tokens`` (from ``_token_values``) where the recipient's fields go.
        ``footer``: ``_EmailPlan.footer(settings, marketing)``, when the caller keeps it for a batch."""
        self.unsub, self.pixel, adds = footer or _EmailPlan.footer(settings, marketing)
        # a body whose own text looks like a token must not be rewritten: it goes as it is, in full
        self.substitute = bool(tokens) or not any(TOKEN_PREFIX in v for v in content.values())
        # per part: (the template's piece, its tokens, the footer's piece, its tokens)
        self.pieces: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {}
        for part in {**content, **adds}:
            piece, add = content.get(part, ""), adds.get(part, "")
            own = tuple(t for t in tokens if t in piece)
            self.pieces[part] = (piece, own, add, tuple(t for t in _FOOTER_TOKENS if t in add))
        self.tokens = tuple(dict.fromkeys(t for p in self.pieces.values() for t in p[1] + p[3]))
        self.values = tuple(t for t in self.tokens if t in tokens)  # the recipient's values the body takes
        self.shared = {part: piece + add for part, (piece, _o, add, _a) in self.pieces.items()}
        # the parts no recipient's values can leave empty: text of their own besides the tokens
        self.full = frozenset(
            part
            for part, (piece, own, add, extra) in self.pieces.items()
            if _fill(piece, dict.fromkeys(own, ""), own) or _fill(add, dict.fromkeys(extra, ""), extra)
        )
        # (a recipient's unsubscribe link, a delivery's pixel URL: both set when they are, with a
        # public URL — ``footer``): made for the first recipient
        self.links: tuple[Callable[[str], str] | None, Callable[[str], str] | None] | None = None

    @staticmethod
    def footer(settings: Any, marketing: bool) -> tuple[bool, bool, dict[str, str]]:
        """(unsubscribe link?, open pixel?, what each part gets at its end, with tokens): the same
        for every body of a batch."""
        marketing = marketing and bool(settings.public_url or settings.postal_address)
        unsub = marketing and bool(settings.public_url)
        pixel = bool(settings.public_url)
        text_footer: list[str] = []
        html_footer: list[str] = []
        if unsub:
            text_footer.append(f"Unsubscribe: {UNSUBSCRIBE_TEXT}")
            html_footer.append(f'<a href="{UNSUBSCRIBE_HTML}">Unsubscribe</a>')
        if marketing and settings.postal_address:
            text_footer.append(settings.postal_address)
            html_footer.append(html.escape(settings.postal_address))
        text_add = html_add = ""
        if text_footer:
            text_add = "\n\n--\n" + "\n".join(text_footer)
            html_add = '\n<p style="font-size:small;color:#666">' + " · ".join(html_footer) + "</p>"
        if pixel:
            html_add += f'\n<img src="{OPEN_PIXEL}" width="1" height="1" alt="">'
        return unsub, pixel, ({"text": text_add, "html": html_add} if (marketing or pixel) else {})

    def apply(
        self, rt: Runtime, d: _D, values: dict[str, str] | None
    ) -> tuple[dict[str, str] | None, dict[str, str] | None, dict[str, str], dict[str, str]]:
        """(content, shared, personal, headers) for one recipient: ``content`` as they get it and,
        when something differs per recipient, ``shared`` with tokens and ``personal`` their values;
        then ``content`` is None: made only if read (``_EmailMessage``, ``content``), as a
        provider that sends ``shared`` with ``personal`` as substitutions never reads it whole."""
        if not values:
            personal: dict[str, str] = {}
        elif len(values) == len(self.values):  # (the body takes them all: self.values are values' keys)
            personal = dict(values)
        else:
            personal = {t: values[t] for t in self.values}
        headers: dict[str, str] = {}
        links = self.links
        if links is None:
            key = rt.unsub_key if self.unsub or self.pixel else b""
            links = self.links = (link_maker(rt.settings, key, "marketing") if self.unsub else None,
                                  pixel_maker(rt.settings, key) if self.pixel else None)  # fmt: skip
        unsub, pixel = links
        if unsub is not None:
            url = unsub(d.user_id)
            headers = {"List-Unsubscribe": f"<{url}>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
            personal[UNSUBSCRIBE_TEXT] = url
            personal[UNSUBSCRIBE_HTML] = _escaped_url(url)
        if pixel is not None:
            personal[OPEN_PIXEL] = _escaped_url(pixel(d.id))
        if not self.tokens or not self.substitute:
            return self.content(personal), None, {}, headers
        return None, self.shared, personal, headers

    def part(self, name: str, personal: dict[str, str]) -> str:
        """The part ``name`` of the content of the recipient whose values are ``personal`` ("" when none)."""
        pieces = self.pieces.get(name)
        if pieces is None:
            return ""
        piece, own, add, extra = pieces
        for t in own:
            piece = piece.replace(t, personal[t])
        for t in extra:
            add = add.replace(t, personal[t])
        return (piece.strip() if own else piece) + add

    def content(self, personal: dict[str, str]) -> dict[str, str]:
        """The content of the recipient whose values are ``personal``: every part (``part``)."""
        return {name: self.part(name, personal) for name in self.pieces}

    def has(self, name: str, personal: dict[str, str]) -> bool:
        """Whether that recipient's part ``name`` is not empty (made only when values could empty it)."""
        return name in self.full or (name in self.pieces and bool(self.part(name, personal)))


_CONTENT = Message.__dict__["content"]  # (the slot of Message's dataclass field, under the property)


class _EmailMessage(Message):
    """An email whose ``content`` is made from its ``plan`` and ``personal`` when it is first read
    (``_EmailPlan.content``, exactly what ``apply`` would have made), and kept. SendGrid sends
    ``shared`` with ``personal`` as the substitutions and reads only the subject (``part``) and
    whether a body is there (``has``): a batch of them is sent without a copy per recipient."""

    __slots__ = ("plan",)  # (set once made: made as a Message is, with None as its content)
    plan: _EmailPlan

    @property
    def content(self) -> dict[str, str]:
        content: dict[str, str] | None = _CONTENT.__get__(self, Message)
        if content is None:
            content = self.plan.content(self.personal)
            _CONTENT.__set__(self, content)
        return content

    @content.setter
    def content(self, value: dict[str, str]) -> None:
        _CONTENT.__set__(self, value)

    def part(self, name: str) -> str:
        content: dict[str, str] | None = _CONTENT.__get__(self, Message)
        if content is not None:
            return content.get(name) or ""
        return self.plan.part(name, self.personal)

    def has(self, name: str) -> bool:
        content: dict[str, str] | None = _CONTENT.__get__(self, Message)
        if content is not None:
            return bool(content.get(name))
        return self.plan.has(name, self.personal)


def _escaped_url(url: str) -> str:
    """``html.escape(url)``: a signed link (base64url under the public URL) has nothing to escape."""
    if "&" in url or "<" in url or ">" in url or '"' in url or "'" in url:
        return html.escape(url)
    return url


def _fill(piece: str, values: dict[str, str], tokens: tuple[str, ...]) -> str:
    """``piece`` with the ``tokens`` it holds replaced by their ``values``, stripped as a rendering is."""
    for token in tokens:
        piece = piece.replace(token, values[token])
    return piece.strip()
