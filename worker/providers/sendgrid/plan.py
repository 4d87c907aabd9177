"""How SendGrid requests are formed from a batch: messages of one category whose bodies are identical
share a request as they are; bodies that differ share one as a skeleton (what they all have, sent
once as the content, with a key such as ``[%sg3%]`` where they differ: :mod:`worker.providers.skeleton`)
and each recipient's own text per key in their personalization's ``substitutions``, which SendGrid
puts back in their copy. SendGrid allows 10,000 bytes of substitutions per personalization: a
recipient whose parts do not fit goes in a smaller group (bodies with the same line structure, then
identical bodies), counted as a fallback and logged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from worker.providers.base import Message
from worker.providers.skeleton import skeleton

log = logging.getLogger("worker.providers.sendgrid")

MAX_SUBSTITUTION_BYTES = 10_000  # per personalization, as JSON
#: Keys of the substitutions that carry what differs per recipient: ``[%sg0%]``, ``[%sg1%]``...
#: A body whose own text holds the opening ``[%sg`` is never cut into a skeleton (it goes as is):
#: then no key can appear in a copy other than where it was put, whatever order SendGrid
#: replaces them in.
KEY_OPEN = "[%sg"
KEY_FORMAT = KEY_OPEN + "{}%]"
#: One request: the messages (indexes), the skeleton content or None, each one's substitutions or None.
Request = tuple[list[int], dict[str, str] | None, list[dict[str, str]] | None]


def groups(messages: Sequence[Message], idxs: list[int]) -> tuple[list[Request], int]:
    """The requests for one category's messages: (indexes, skeleton content or None, each one's
    substitutions or None). Identical bodies (``Message.shared`` when the pipeline gives it) go
    as they are; different ones as one skeleton; what does not fit, in smaller groups. And how
    many did not fit one skeleton (the fallbacks)."""
    first = messages[idxs[0]].shared or messages[idxs[0]].content
    text, html = first.get("text") or "", first.get("html") or ""
    for i in idxs:  # (compared, not hashed: a difference shows in the first bytes, mostly)
        body = messages[i].shared or messages[i].content
        if (body.get("text") or "") != text or (body.get("html") or "") != html:
            break
    else:
        # one body for all, each recipient's values as their substitutions: those whose values do
        # not fit go on their own, their copy as it is
        big = [i for i in idxs if messages[i].shared is not None and not substitutions_fit(messages[i].personal)]
        if not big:
            return [(idxs, None, None)], 0
        log.info("sendgrid: %d recipients' values did not fit their substitutions: sent one by one", len(big))
        too_big = set(big)
        fit = [i for i in idxs if i not in too_big]
        alone: list[Request] = [([i], messages[i].content, [{}]) for i in big]
        return ([(fit, None, None)] if fit else []) + alone, len(big)
    out: list[Request] = []
    own: list[int] = []  # bodies that hold a key's opening: sent as they are
    kinds: dict[tuple[bool, bool], list[int]] = {}  # a skeleton for bodies with the same parts
    for i in idxs:
        c = messages[i].content
        text, html = c.get("text") or "", c.get("html") or ""
        if KEY_OPEN in text or KEY_OPEN in html or KEY_OPEN in c["subject"]:
            own.append(i)
        else:
            kinds.setdefault((bool(text), bool(html)), []).append(i)
    left: list[int] = []
    cut: list[int] = []
    for kind in kinds.values():
        cut += kind
        left += _skeleton_group(messages, kind, out) if len(kind) > 1 else kind
    if left:  # smaller groups: bodies with the same line structure, then identical bodies
        shapes: dict[tuple[int, int], list[int]] = {}  # (-1: no such part)
        for i in left:
            c = messages[i].content
            text, html = c.get("text") or "", c.get("html") or ""
            shape = (text.count("\n") if text else -1, html.count("\n") if html else -1)
            shapes.setdefault(shape, []).append(i)
        rest: list[int] = []
        for group in shapes.values():
            rest += _skeleton_group(messages, group, out) if 1 < len(group) < len(cut) else group
        log.info(
            "sendgrid: %d of %d different bodies did not fit one request's substitutions (%d bytes each)",
            len(left),
            len(cut),
            MAX_SUBSTITUTION_BYTES,
        )
        own += rest
    if own:
        same: dict[tuple[str, str], list[int]] = {}
        for i in own:
            body = messages[i].shared or messages[i].content
            same.setdefault((body.get("text") or "", body.get("html") or ""), []).append(i)
        out += [(group, None, None) for group in same.values()]
    return out, len(left)


def _skeleton_group(messages: Sequence[Message], idxs: list[int], out: list[Request]) -> list[int]:
    """Adds to ``out`` the request for those of ``idxs`` whose substitutions fit; returns the others."""
    parts = [p for p in ("text", "html") if any(messages[i].content.get(p) for i in idxs)]
    content: dict[str, str] = {}
    subs: list[dict[str, str]] = [{} for _ in idxs]
    used = 0
    for part in parts:
        skel, keys, values = skeleton([messages[i].content.get(part, "") for i in idxs], used, KEY_FORMAT)
        used += len(keys)
        content[part] = skel
        for own, vals in zip(subs, values, strict=True):
            own.update(zip(keys, vals, strict=True))
    fit: list[int] = []
    fit_subs: list[dict[str, str]] = []
    left: list[int] = []
    for i, own in zip(idxs, subs, strict=True):
        if substitutions_fit(own):
            fit.append(i)
            fit_subs.append(own)
        else:
            left.append(i)
    if fit:
        out.append((fit, content, fit_subs))
    return left


def substitutions_fit(subs: dict[str, str], limit: int = MAX_SUBSTITUTION_BYTES) -> bool:
    """Whether ``subs`` is within SendGrid's limit as JSON (``json.dumps``, every non-ASCII character
    escaped: the largest way to count). Serialised only when a cheap bound does not settle it."""
    n = 2 + 8 * len(subs) + sum(map(len, subs)) + sum(map(len, subs.values()))
    if n > limit:
        return False
    if n * 12 <= limit:
        return True
    return len(json.dumps(subs)) <= limit
