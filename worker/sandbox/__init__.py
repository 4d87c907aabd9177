"""Local servers that speak each provider's real wire protocol, for tests, staging and load runs.

Each records what it accepted and can inject faults on demand. See ``worker.sandbox.base``.
"""
