"""Who may receive what: the one eligibility rule, used by intake (``notifyctl.intake``), the
pipeline's fan-out (``worker.pipeline.fanout``) and the campaign dry run (``campaigns.dryrun``) alike.

For one user, one channel and the notification's category, in this order:

1. an opt-out for the channel (or ``*``) and the category (or ``*``) → ``opted_out:<channel>:<category>``;
2. no address on the channel (no live device token, no email, no phone) → ``no_address:<channel>``;
3. marketing SMS without the user's explicit consent (``sms_opt_in``; SMS costs money and consent is
   the law, TCPA) → ``no_sms_opt_in``.

What passes is then rendered and rate-limited: the rules are ``Settings.rules`` and the windows live
in Redis, counted by ``worker.ratelimit.RateLimiter`` (``check_many`` records a send, ``counts`` only
looks).

What an outcome means for a delivery once sent (sent, retry at, dead-letter, remove the address) is
``worker.pipeline.outcome.decide``: it reads the providers' outcome types, a layer above this one.
"""

from __future__ import annotations

from dataclasses import dataclass


def blocked_by(opt_outs: set[tuple[str, str]], channel: str, category: str) -> str | None:
    """The opt-out that forbids ``channel`` × ``category``, as ``channel:category``, or None."""
    for c in (channel, "*"):
        for k in (category, "*"):
            if (c, k) in opt_outs:
                return f"{c}:{k}"
    return None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a channel is not sent to a user: ``kind`` (``opted_out``, ``no_address``, ``no_sms_opt_in``)
    and what it is about (the opt-out, the channel)."""

    kind: str
    detail: str = ""

    @property
    def reason(self) -> str:
        """As a delivery's ``reason``: ``opted_out:email:marketing``, ``no_address:sms``, ``no_sms_opt_in``."""
        return f"{self.kind}:{self.detail}" if self.detail else self.kind


def refusal(
    channel: str, category: str, opt_outs: set[tuple[str, str]] | None, has_address: bool, sms_opt_in: bool
) -> Refusal | None:
    """None when ``channel`` may carry a ``category`` notification to this user (see the module
    docstring), else why not. ``opt_outs``: the user's, None or empty when there are none."""
    block = blocked_by(opt_outs, channel, category) if opt_outs else None
    if block:
        return Refusal("opted_out", block)
    if not has_address:
        return Refusal("no_address", channel)
    if channel == "sms" and category == "marketing" and not sms_opt_in:
        return Refusal("no_sms_opt_in")
    return None
