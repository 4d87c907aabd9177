"""What the bulk email tests share (tests/test_sendgrid_skeleton.py, tests/test_ses_bulk.py): the
per-recipient Jinja bodies they render, the recipients hypothesis draws for them, and the messages
they hand the provider. Each provider's test keeps its own alphabet: the characters that could be
read as that vendor's substitution syntax."""

from __future__ import annotations

from typing import Any

import jinja2
from hypothesis import strategies as st

from worker.providers.base import Message

_html = jinja2.Environment(autoescape=True)
_text = jinja2.Environment(autoescape=False)

TEXT = _text.from_string(
    "Hi {{ name }},\n{% for label, price in items %}- {{ label }}: {{ price }}\n{% endfor %}"
    "{% if vip %}Your code: {{ code }}{% else %}No code this week{% endif %}\nBye"
)


def html(footer: str) -> jinja2.Template:
    """A body whose every part but ``footer`` differs per recipient (name, VIP code, items)."""
    return _html.from_string(
        "<h1>Hi {{ name }}</h1>\n{% if vip %}<p class=vip>VIP: {{ code }}</p>\n{% endif %}"
        "<ul>\n{% for label, price in items %}<li>{{ label }} — {{ '%.2f'|format(price) }}</li>\n{% endfor %}</ul>\n"
        "<p>{{ items|length }} item(s){% if not items %}: nothing yet{% endif %}.</p>\n" + footer
    )


def recipients(alphabet: str, max_size: int) -> st.SearchStrategy[dict[str, Any]]:
    """One recipient's data: name, VIP flag, code, priced items, the strings drawn from ``alphabet``."""
    words = st.text(alphabet=st.sampled_from(alphabet), min_size=0, max_size=max_size)
    return st.fixed_dictionaries(
        {
            "name": words,
            "vip": st.booleans(),
            "code": words,
            "items": st.lists(st.tuples(words, st.floats(0, 1000, allow_nan=False)), max_size=4),
        }
    )


def message(
    i: int,
    content: dict[str, str],
    category: str = "marketing",
    headers: dict[str, str] | None = None,
    priority: str = "low",
) -> Message:
    """Recipient ``i``'s email (``user{i}@example.org``) with ``content``."""
    return Message(
        delivery_id=f"d-{i}",
        notification_id=f"n-{i}",
        channel="email",
        route="email",
        address=f"user{i}@example.org",
        content=content,
        category=category,
        priority=priority,
        headers=dict(headers or {}),
    )
