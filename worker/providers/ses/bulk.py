"""Planning ``SendBulkEmail`` calls so that a batch stays batched when every body differs.

SES's templates are Handlebars-based, and with inline ``TemplateContent`` SES does "only simple
substitutions" of ``{{name}}`` from the entry's ``ReplacementTemplateData`` (merged over the
template's ``TemplateData``) — and "doesn't escape HTML content when rendering" (SES developer guide,
Advanced email personalization; API reference, ``Template.TemplateContent``). So a value goes into
the copy verbatim, which is what we need: the bodies were rendered (and HTML-escaped) by Jinja, and
the template only puts each recipient's own rendered parts back.

The bodies of one chunk (``bulk_size`` marketing messages with the same parts; other categories
share a call only with identical bodies, see ``CUT_CATEGORIES``) are cut by
:func:`worker.providers.skeleton.skeleton`: what they share goes once as the template content (subject,
text, html), with a key ``{{s0}}``, ``{{s1}}``... where they differ; each entry's data holds that
recipient's text for each key. Identical bodies have no keys (``TemplateData`` ``{}``). Guards,
each sending the message through ``SendEmail`` instead:

- content holding ``{{`` anywhere (SES would read it as a placeholder; checked by the client), so no
  value and no shared text can make a placeholder of its own;
- a key next to ``{``, ``}`` or ``\\`` in the shared text (``{{{s0}}`` or ``\\{{s0}}`` mean other things
  to Handlebars): the chunk falls back to groups of identical bodies;
- an entry whose data is over ``MAX_ENTRY_DATA`` (SES: 262,144 characters of
  ``ReplacementTemplateData``), template content over ``MAX_TEMPLATE``, and calls over
  ``MAX_CALL_DATA`` (our own bound on one request, not an SES figure) are split in halves.

Those that could not join their chunk are counted (``Provider.fallbacks``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from worker.providers.base import Message
from worker.providers.skeleton import skeleton

KEY_FORMAT = "{{{{s{}}}}}"  # {{s0}}, {{s1}}...
MAX_ENTRY_DATA = 262_144  # characters of one entry's ReplacementTemplateData (SES API reference)
MAX_TEMPLATE = 1_000_000  # inline template content (SES: up to 1 MB, text and html parts included)
MAX_CALL_DATA = 4_000_000  # template content + every entry's data in one call: our own bound
_PARTS = (("Subject", "subject"), ("Text", "text"), ("Html", "html"))
#: Categories whose different bodies share a call. Transactional and alert mail is one person's own
#: message (a receipt, a sign-in alert): bodies of different notifications share little, and a
#: whole-call error must not fail fifty of them; they share a call only with identical bodies.
CUT_CATEGORIES = frozenset({"marketing"})


@dataclass(slots=True)
class Chunk:
    """One SendBulkEmail call: the messages (indexes), the template content, each entry's data (JSON)."""

    idxs: list[int]
    content: dict[str, str]
    data: list[str]


def plan(messages: Sequence[Message], idxs: list[int], size: int) -> tuple[list[Chunk], list[int], int]:
    """The calls for ``messages[idxs]`` (bulk-eligible, in order); the indexes that go through
    SendEmail (alone in their category and parts, or not fitting a chunk); how many of those did
    not fit (the fallbacks)."""
    groups: dict[tuple[str, bool, bool], list[int]] = {}
    for i in idxs:
        c = messages[i].content
        groups.setdefault((messages[i].category, bool(c.get("text")), bool(c.get("html"))), []).append(i)
    chunks: list[Chunk] = []
    alone: list[int] = []
    left: list[int] = []
    for (category, _text, _html), group in groups.items():
        if category not in CUT_CATEGORIES:
            _identical(messages, group, size, chunks, alone)
        elif len(group) < 2:
            alone += group
        else:
            for start in range(0, len(group), size):
                _cut(messages, group[start : start + size], chunks, left)
    return chunks, alone + left, len(left)


def _cut(messages: Sequence[Message], idxs: list[int], chunks: list[Chunk], singles: list[int]) -> None:
    if len(idxs) < 2:
        singles += idxs
        return
    present = [(name, part) for name, part in _PARTS if part == "subject" or messages[idxs[0]].content.get(part)]
    content: dict[str, str] = {}
    data: list[dict[str, str]] = [{} for _ in idxs]
    used = 0
    for name, part in present:
        skel, keys, values = skeleton([messages[i].content.get(part) or "" for i in idxs], used, KEY_FORMAT)
        if not _stand_alone(skel, keys):
            _identical(messages, idxs, len(idxs), chunks, singles)
            return
        used += len(keys)
        content[name] = skel
        names = [key[2:-2] for key in keys]  # {{s0}} → s0, the name in the entry's data
        for own, vals in zip(data, values, strict=True):
            own.update(zip(names, vals, strict=True))
    if len(json.dumps(content)) > MAX_TEMPLATE:
        singles += idxs
        return
    fit: list[int] = []
    encoded: list[str] = []
    for i, own in zip(idxs, data, strict=True):
        text = json.dumps(own, ensure_ascii=False) if own else "{}"
        if len(text) <= MAX_ENTRY_DATA:
            fit.append(i)
            encoded.append(text)
        else:
            singles.append(i)
    if len(fit) < len(idxs):  # without the outsiders: a tighter skeleton, maybe
        _cut(messages, fit, chunks, singles)
        return
    if sum(map(len, encoded)) + len(json.dumps(content)) > MAX_CALL_DATA:
        half = len(fit) // 2
        _cut(messages, fit[:half], chunks, singles)
        _cut(messages, fit[half:], chunks, singles)
        return
    chunks.append(Chunk(fit, content, encoded))


def _stand_alone(skel: str, keys: list[str]) -> bool:
    """Whether every key stands alone in ``skel``: no ``{``/``\\`` before it, no ``}`` after it."""
    for key in keys:
        at = skel.find(key)
        before = skel[at - 1] if at > 0 else ""
        after = skel[at + len(key) : at + len(key) + 1]
        if before in ("{", "\\") or after == "}":
            return False
    return True


def _identical(
    messages: Sequence[Message], idxs: list[int], size: int, chunks: list[Chunk], singles: list[int]
) -> None:
    """Calls of up to ``size`` identical messages (no keys); the others go alone."""
    same: dict[tuple[str, str, str], list[int]] = {}
    for i in idxs:
        c = messages[i].content
        same.setdefault((c.get("subject") or "", c.get("text") or "", c.get("html") or ""), []).append(i)
    for (subject, text, html), group in same.items():
        if len(group) < 2:
            singles += group
            continue
        content = {"Subject": subject}
        if text:
            content["Text"] = text
        if html:
            content["Html"] = html
        for start in range(0, len(group), size):
            part = group[start : start + size]
            if len(part) < 2:
                singles += part
            else:
                chunks.append(Chunk(part, content, ["{}"] * len(part)))
