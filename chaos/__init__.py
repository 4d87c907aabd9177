"""Fault-injection suite (issue 8): `python -m chaos.run`."""
