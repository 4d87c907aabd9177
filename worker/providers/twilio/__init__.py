"""Twilio, the whole vendor in one place (issue 16):

- :mod:`.client` — Programmable Messaging and Voice through the official SDK: the ``Provider`` (the
  answers' mapping to outcomes, ``check``/``describe``), its ``Config``;
- :mod:`.webhook` — ``X-Twilio-Signature`` verification, status callbacks (matched back by the
  ``MessageSid`` and the ``delivery_id`` the client puts in the callback URL) and inbound SMS
  keywords (STOP / START / HELP).

Why here and not in ``notifyctl.api``: the send side (layer 1, ``worker``) and the webhook side must
agree on the callback URL and the error codes, so both live in the vendor's package; the HTTP API
(layer 3) may import downwards and only dispatches to :mod:`.webhook`, while the worker never imports
the API. The fake Twilio for tests is ``sandboxes.twilio``.
"""

from worker.providers.twilio.client import Config, Provider, voice_twiml

__all__ = ["Config", "Provider", "voice_twiml"]
