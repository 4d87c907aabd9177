"""What the modules share (issue 16): the secret masker, the Retry-After parser, the vocabulary."""

from __future__ import annotations

import time
from email.utils import formatdate

from pydantic import SecretStr

from notifyctl.masking import mask
from worker.providers.base import retry_after


def test_mask_shows_the_last_four_only_of_a_long_secret() -> None:
    assert mask(SecretStr("SG.abcdefghijklmnop1234")) == "****1234"
    assert mask("short-secret") == "(set)"  # 12 characters: four would give too much away
    assert mask("AKIA0001", reveal_from=9) == "(set)"
    assert mask("AKIA00001", reveal_from=9) == "****0001"
    assert mask(None) == mask("") == mask(SecretStr("")) == "(not set)"


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("3") == 3.0
    assert retry_after(" 2.5 ") == 2.5
    assert retry_after("-4") == 0.0
    later = retry_after(formatdate(time.time() + 120, usegmt=True))
    assert later is not None and 100 < later <= 120
    assert retry_after(formatdate(time.time() - 120, usegmt=True)) == 0.0
    for unreadable in (None, "", "soon", "inf", "nan", "Mon, 99 Foo 2026"):
        assert retry_after(unreadable) is None, unreadable


def test_the_vocabulary_names_every_provider_and_route() -> None:
    from notifyctl.settings import Settings
    from notifyctl.vocabulary import PROVIDERS, ROUTES
    from worker.providers import REGISTRY

    assert tuple(REGISTRY) == PROVIDERS
    assert all("providers_" + route.replace(".", "_") in Settings.model_fields for route in ROUTES)
