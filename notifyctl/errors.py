"""notifyctl's errors.

NotifyError                 base; ``str(e)`` is a one-line message fit for a user
├── InputError              bad input (flag, JSON, CSV row, template data): CLI exit 2, HTTP 4xx
│   ├── BadJSON             text that is not JSON we accept (``notifyctl.jsonload``): HTTP 400
│   └── TemplateError       unknown template, missing variable, syntax error
├── ConfigError             settings or environment unusable (Redis unreachable, bad URL): exit 3
└── NotFound                a named thing does not exist: exit 4 (HTTP 404)
"""


class NotifyError(Exception):
    exit_code = 1


class InputError(NotifyError):
    exit_code = 2


class BadJSON(InputError):
    pass


class TemplateError(InputError):
    pass


class ConfigError(NotifyError):
    exit_code = 3


class NotFound(NotifyError):
    exit_code = 4


def one_line(text: object, limit: int = 300) -> str:
    """A message fit for one line: every run of whitespace and line separators becomes one space."""
    t = " ".join(str(text).split())
    return t if len(t) <= limit else t[: limit - 1] + "…"
