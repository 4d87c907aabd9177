"""Amazon SES, the whole vendor in one place (issue 16):

- :mod:`.client` — SES v2 sending: the ``Provider`` (``SendEmail``, ``SendBulkEmail`` with its
  fallback, the answers' mapping to outcomes, ``check``/``describe``); the AWS plumbing it shares
  with the SNS SMS provider is :mod:`worker.providers.aws`;
- :mod:`.webhook` — SES event records through SNS: the envelope, subscription confirmations, the
  records' mapping to ``notifyctl.inbound.Event`` (matched back by the ``delivery_id`` tag the client
  puts on every message);
- :mod:`.sns_signature` — verifying an SNS message's signature without letting strangers make us
  fetch (the certificate cache).

Why here and not in ``notifyctl.api``: the send side (layer 1, ``worker``) and the webhook side must
agree on what the client tags a message with, so both live in the vendor's package; the HTTP API
(layer 3) may import downwards and only dispatches to :mod:`.webhook`, while the worker never imports
the API. The fake SES for tests is ``sandboxes.aws``.
"""

from worker.providers.ses import client
from worker.providers.ses.client import Config, Provider, header_value, tag_value
from worker.providers.ses.outcomes import bulk_refused

__all__ = ["Config", "Provider", "bulk_refused", "client", "header_value", "tag_value"]
