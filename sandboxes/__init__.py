"""Local servers that speak each provider's real wire protocol, for tests, staging and load runs.

Each records what it accepted and can inject faults on demand (see ``sandboxes.base``);
``sandboxes.sandbox_set`` starts the set ``notifyctl sandbox`` runs. A package of the source
checkout, beside ``bench/`` and ``chaos/``: not in the wheel, its test-only deps (aiosmtpd, moto)
are the ``[sandbox]`` extra.
"""
