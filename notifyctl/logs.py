"""Logging: plain text for people, or one JSON object per line (``--log-json`` /
``NOTIFY_LOG_FORMAT=json``) for log shippers. Records about a notification carry its id (and the
delivery, provider and route where they apply) as fields, in both formats."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

FIELDS = ("notification_id", "delivery_id", "provider", "route", "job_id", "worker")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for f in FIELDS:
            v = getattr(record, f, None)
            if v is not None:
                out[f] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        extras = " ".join(f"{f}={getattr(record, f)}" for f in FIELDS if getattr(record, f, None) is not None)
        return f"{base} {extras}" if extras else base


def setup(level: str | int = "WARNING", json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # RQ logs every job at INFO; keep it at WARNING unless asked for DEBUG
    logging.getLogger("rq.worker").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
