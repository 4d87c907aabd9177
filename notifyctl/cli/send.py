from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from notifyctl.cli.common import JsonOpt, console, get_ctx, print_json
from notifyctl.errors import InputError
from notifyctl.intake import parse_request, submit
from notifyctl.jsonload import load_json


def _parse_data(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--data: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip()
        if not k:
            raise InputError(f"--data: empty key in {item!r}")
        out[k] = v
    return out


def _shown(value: Any) -> str:
    """A value for a one-line message: quoted and escaped, cut at 60 characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > 60:
        text = text[:59] + "…"
    return repr(text) if isinstance(value, str) else text


def _agree(key: str, in_file: Any, flag: Any) -> bool:
    """A flag and the file's field name the same thing (channels in any order)."""
    if key == "channels" and isinstance(in_file, list):
        return sorted(set(map(str, in_file))) == sorted(set(flag))
    if isinstance(in_file, str) and isinstance(flag, str):
        return in_file.strip() == flag.strip()
    return bool(in_file == flag)


def _data_agree(in_file: Any, flag: Any, flag_is_text: bool) -> bool:
    """``--data KEY=VALUE`` gives text: it agrees with the file's 5 when it reads "5"."""
    if in_file == flag:
        return True
    return flag_is_text and not isinstance(in_file, str) and json.dumps(in_file) == flag


def send(
    ctx: typer.Context,
    recipient: str | None = typer.Argument(None, help="recipient_id (a user id), unless given in --file."),
    template: str | None = typer.Option(None, "--template", "-t", help="template_id, e.g. order_shipped_v2."),
    channel: list[str] = typer.Option(
        [], "--channel", "-c", help="push, email, sms or all; repeat or comma-separate. Default: all."
    ),
    priority: str | None = typer.Option(
        None, "--priority", "-p", help="high | normal | low (default: the template's)."
    ),
    data: list[str] = typer.Option([], "--data", "-d", help="Template data KEY=VALUE; repeatable."),
    data_json: str | None = typer.Option(None, "--data-json", help="Template data as a JSON object."),
    dedup_key: str | None = typer.Option(None, "--dedup-key", "-k", help="Idempotency key (24 h window)."),
    type_: str | None = typer.Option(None, "--type", help="Notification type (default: the template id)."),
    ordering_key: str | None = typer.Option(
        None, "--ordering-key", help="Sent after every earlier notification of this recipient, priority and key."
    ),
    file: str | None = typer.Option(
        None, "--file", "-f", help="Read the request JSON (the POST /v1/notify body) from a file, or - for stdin."
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Submit one notification. Prints its id and `queued`, or `suppressed: <reason>`.

    \b
    Examples:
      notifyctl send alice -t order_shipped_v2 -c push,email -d order_id=ORD-456 -d tracking_url=https://t.example/1
      notifyctl send alice -t otp_code -p high -c sms -d code=123456 -d minutes=10 -k otp:alice:1
      echo '{"recipient_id":"alice","template_id":"otp_code","data":{"code":"1","minutes":5}}' | notifyctl send -f -
    """
    payload: dict[str, Any] = {}
    if file is not None:
        if file == "-":
            raw = sys.stdin.read()
        else:
            try:
                raw = Path(file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
                raise InputError(f"--file: cannot read {file!r}: {why}") from None
        payload = load_json(raw, "request")
        if not isinstance(payload, dict):
            raise InputError("request: expected a JSON object")
    from_file = set(payload)
    flags: dict[str, Any] = {
        "recipient_id": recipient,
        "template_id": template,
        "channels": [c.strip() for item in channel for c in item.split(",") if c.strip()] if channel else None,
        "priority": priority,
        "type": type_,
        "dedup_key": dedup_key,
        "ordering_key": ordering_key,
    }
    names = {
        "recipient_id": "RECIPIENT",
        "template_id": "--template",
        "channels": "--channel",
        "priority": "--priority",
        "type": "--type",
        "dedup_key": "--dedup-key",
        "ordering_key": "--ordering-key",
    }
    for key, value in flags.items():
        if value is None:
            continue
        if key in from_file and not _agree(key, payload[key], value):
            raise InputError(
                f"{key}: {names[key]} says {_shown(value)} but the file says {_shown(payload[key])} "
                "(give one, or the same)"
            )
        payload[key] = value
    extra: dict[str, Any] = {}
    if data_json is not None:
        extra = load_json(data_json, "--data-json")
        if not isinstance(extra, dict):
            raise InputError("--data-json: expected a JSON object")
    kv = _parse_data(data)
    if extra or kv:
        base = payload.get("data", {})
        if not isinstance(base, dict):
            raise InputError("data: expected a JSON object")
        for flag, items in (("--data-json", extra), ("--data", kv)):
            for k, v in items.items():
                if k in base and "data" in from_file and not _data_agree(base[k], v, flag == "--data"):
                    raise InputError(
                        f"data.{k}: {flag} says {_shown(v)} but the file says {_shown(base[k])} (give one, or the same)"
                    )
        payload["data"] = {**base, **extra, **kv}
    if "recipient_id" not in payload:
        raise InputError("recipient_id: missing (give RECIPIENT or a --file with recipient_id)")
    if "template_id" not in payload:
        raise InputError("template_id: missing (give --template or a --file with template_id)")

    req = parse_request(payload)
    result = submit(get_ctx(ctx), req)
    if as_json:
        print_json(result.to_dict())
    elif result.status == "queued":
        console.print(f"{result.notification_id} queued")
    else:
        console.print(f"{result.notification_id} suppressed: {result.reason}")
