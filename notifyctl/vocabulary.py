"""The project's fixed words, in one place: channels, categories, priorities, routes, providers.

``ROUTES`` are the delivery routes a channel's message goes out on (``push`` splits by platform);
``VOICE_ROUTE`` is the OTP fallback call, configured only when wanted. ``PROVIDERS`` are the names a
route's provider list may hold (``worker.providers.REGISTRY`` maps each to its module).
"""

from __future__ import annotations

CHANNELS = ("push", "email", "sms")
CATEGORIES = ("transactional", "marketing", "alerts")
PRIORITIES = ("high", "normal", "low")

ROUTES = ("push.ios", "push.android", "email", "sms")
VOICE_ROUTE = "voice"

PROVIDERS = ("outbox", "apns", "fcm", "sendgrid", "ses", "smtp", "twilio", "sns")
