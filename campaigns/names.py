"""Campaign names and references, as a user types them on a shell.

A campaign has an id (``c_01k...``) and a name without spaces: ``--name`` or, by default, the
template and the UTC date (``weekly_promo-2026-11-25``, then ``weekly_promo-2026-11-25-2`` for
a second launch that day). Names are unique. ``find_campaign`` takes the id, the name, or any
prefix of either that only one campaign has (``weekly_promo-2026-11``, ``c_01k``).
"""

from __future__ import annotations

import re
from datetime import datetime

from sqlalchemy import or_, select
from sqlmodel import Session, col

from notifyctl.errors import InputError, NotFound
from notifyctl.models import Campaign

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_SHOWN = 5  # candidates named in an "ambiguous" error


def check_name(name: str) -> str:
    """``name`` if it is usable as a reference on a shell, else InputError saying why."""
    if not _NAME.fullmatch(name):
        bad = "spaces" if any(c.isspace() for c in name) else "characters other than letters, digits and ._:@+-"
        raise InputError(
            f"--name: {name!r} has {bad} or is too long; use up to 128 of A-Z a-z 0-9 . _ : @ + - "
            "(e.g. spring-sale-2026), starting with a letter or digit"
        )
    return name


def taken(session: Session, name: str) -> Campaign | None:
    return session.scalars(select(Campaign).where(col(Campaign.name) == name)).first()


def default_name(session: Session, template_id: str, now: datetime) -> str:
    """``<template>-<UTC date>``, with ``-2``, ``-3``... when that day already has one."""
    base = f"{template_id}-{now:%Y-%m-%d}"
    same_day = or_(col(Campaign.name) == base, col(Campaign.name).startswith(base + "-", autoescape=True))
    used = set(session.scalars(select(col(Campaign.name)).where(same_day)))
    if base not in used:
        return base
    n = 2
    while f"{base}-{n}" in used:
        n += 1
    return f"{base}-{n}"


def find_campaign(session: Session, ref: str) -> Campaign:
    """The campaign ``ref`` names: its id, its name, or a prefix of either that only one campaign
    has. NotFound (exit 4) when none does; InputError (exit 2) naming the candidates when several do."""
    ref = ref.strip()
    if not ref:
        raise InputError("campaign: give its id or name (see `notifyctl campaign list`)")
    c = session.get(Campaign, ref)
    if c is not None:
        return c
    exact = list(session.scalars(select(Campaign).where(col(Campaign.name) == ref)))
    if len(exact) == 1:
        return exact[0]
    candidates = exact or list(
        session.scalars(
            select(Campaign)
            .where(
                or_(
                    col(Campaign.id).startswith(ref, autoescape=True),
                    col(Campaign.name).startswith(ref, autoescape=True),
                )
            )
            .order_by(col(Campaign.created_at).desc())
            .limit(_SHOWN + 1)
        )
    )
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise NotFound(f"no campaign with id or name {ref!r} (see `notifyctl campaign list`)")
    shown = ", ".join(f"{c.name} ({c.id})" for c in candidates[:_SHOWN])
    more = " and more" if len(candidates) > _SHOWN else ""
    raise InputError(f"campaign {ref!r} is ambiguous: it matches {shown}{more}; give more of the name or the id")
