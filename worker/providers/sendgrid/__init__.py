"""SendGrid, the whole vendor in one place (issue 16):

- :mod:`.client` — Mail Send v3: the ``Provider`` (requests, the answers' mapping to outcomes,
  ``check``/``describe``);
- :mod:`.plan` — how a batch becomes requests (identical bodies, skeleton + substitutions, smaller
  groups for what does not fit);
- :mod:`.webhook` — the Signed Event Webhook: signature verification and the events' mapping to
  ``notifyctl.inbound.Event`` (matched back by the ``custom_args`` the client sends).

Why here and not in ``notifyctl.api``: the send side (layer 1, ``worker``) and the webhook side must
agree on what the client puts in a request (``custom_args``, the message id it records), so both
live in the vendor's package; the HTTP API (layer 3) may import downwards and only dispatches to
:mod:`.webhook`, while the worker never imports the API. The fake SendGrid for tests is
``sandboxes.sendgrid``.
"""

from worker.providers.sendgrid.client import MAX_PERSONALIZATIONS, Config, Provider
from worker.providers.sendgrid.plan import KEY_FORMAT, KEY_OPEN, MAX_SUBSTITUTION_BYTES, substitutions_fit
from worker.providers.skeleton import skeleton

__all__ = [
    "KEY_FORMAT",
    "KEY_OPEN",
    "MAX_PERSONALIZATIONS",
    "MAX_SUBSTITUTION_BYTES",
    "Config",
    "Provider",
    "skeleton",
    "substitutions_fit",
]
