"""notifyctl: push, email and SMS notifications with preferences, dedup, rate limits, retries and tracking."""

__version__ = "0.1.0"
