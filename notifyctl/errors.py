"""notifyctl's errors: one tree; each error knows its CLI exit code and its HTTP status.

NotifyError                 base; ``str(e)`` is a one-line message fit for a user    exit 1, HTTP 503
├── InputError              bad input (flag, JSON, CSV row, template data)           exit 2, HTTP 422
│   ├── BadJSON             text that is not JSON we accept (``notifyctl.jsonload``)  exit 2, HTTP 400
│   └── TemplateError       unknown template, missing variable, syntax error         exit 2, HTTP 422
├── ConfigError             settings or environment unusable (Redis unreachable...)  exit 3, HTTP 503
├── NotFound                a named thing does not exist                             exit 4, HTTP 404
└── ApiError                an HTTP answer the API chose (401 unsigned, 403 forged, 413, 429...): its
                            status and headers as given; exit 2 for a 4xx, else 1

:func:`translate` turns the foreign errors a user can cause or meet (Redis down, the database
refusing, a bad setting, the network) into these; the CLI (``notifyctl.cli.main``) and the HTTP API
(``notifyctl.api.app``) both use it, so both say the same thing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class NotifyError(Exception):
    exit_code = 1
    http_status = 503
    public: str | None = None  # what an HTTP client is told when it must be less than str(self)


class InputError(NotifyError):
    exit_code = 2
    http_status = 422


class BadJSON(InputError):
    http_status = 400


class TemplateError(InputError):
    pass


class ConfigError(NotifyError):
    exit_code = 3


class NotFound(NotifyError):
    exit_code = 4
    http_status = 404


class ApiError(NotifyError):
    """An HTTP answer: ``status`` (also ``http_status``), one-line ``message``, optional ``headers``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = self.http_status = status
        self.exit_code = 2 if 400 <= status < 500 else 1
        self.message = message
        self.headers = headers


def translate(exc: BaseException) -> NotifyError | None:
    """``exc`` as one of ours, or None when it is a bug (let it surface as one)."""
    if isinstance(exc, NotifyError):
        return exc
    # imported here: the CLI's start-up must not pay for them when nothing goes wrong
    import httpx
    import redis
    from pydantic import ValidationError
    from sqlalchemy.exc import OperationalError

    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        err = ConfigError(f"Redis unreachable: {exc}")
        err.public = "Redis unreachable"  # the host and port are no business of an HTTP client
        return err
    if isinstance(exc, OperationalError):
        return ConfigError(f"database error: {str(exc.orig).splitlines()[0] if exc.orig else 'unavailable'}")
    if isinstance(exc, ValidationError):
        return ConfigError(f"bad setting: {validation_message(exc)}")
    if isinstance(exc, httpx.TransportError):
        return ConfigError(f"network error: {one_line(exc) or type(exc).__name__}")
    return None


def _field(p: object) -> str:
    s = str(p)
    return s if s and s.isprintable() and s.strip() == s else repr(s)


def errors_line(errors: Sequence[Any], skip: Iterable[object] = ()) -> str:
    """One line naming the first bad field of pydantic's ``errors()`` (``skip``: location parts
    left out, as FastAPI's ``body``), and how many more there are."""
    if not errors:
        return "request: invalid"
    err, skipped = errors[0], set(skip)
    loc = ".".join(_field(p) for p in err.get("loc", ()) if p not in skipped) or "request"
    msg = str(err.get("msg", "invalid"))
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif err.get("type") == "json_invalid":
        msg = "malformed JSON"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {msg}{more}"


def validation_message(exc: ValidationError) -> str:
    """One line naming the first bad field."""
    return errors_line(exc.errors())


def one_line(text: object, limit: int = 300) -> str:
    """A message fit for one line: every run of whitespace and line separators becomes one space."""
    t = " ".join(str(text).split())
    return t if len(t) <= limit else t[: limit - 1] + "…"
