"""The one JSON loader (``notifyctl.jsonload``) and the CLI entry points that go through it:
`send --file` / `--data-json`, `campaign launch --data-json`, `templates render --data`.
The HTTP entry points are in test_api.py, test_webhooks.py and test_fuzz.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from notifyctl.cli.main import app as cli_app
from notifyctl.context import Context
from notifyctl.errors import BadJSON, InputError
from notifyctl.jsonload import MAX_DEPTH, load_json
from tests.conftest import cli_env
from tests.fuzz_util import snapshot
from tests.util import seed

runner = CliRunner()

# text → what the one line says (Python's json module: a RecursionError, a ValueError, or accepted)
REFUSED = [
    ("[" * 1000 + "]" * 1000, f"malformed JSON: nested deeper than {MAX_DEPTH} levels"),
    ("[" * 100_000, f"malformed JSON: nested deeper than {MAX_DEPTH} levels"),
    ('{"n": ' + "1" * 5000 + "}", "a number of 5000 digits (at most 100; send it as a string)"),
    ('{"n": 0.' + "1" * 200 + "}", "a number of 202 characters"),
    ('{"n": NaN}', "NaN is not a JSON value"),
    ('{"n": Infinity}', "Infinity is not a JSON value"),
    ('{"n": -Infinity}', "-Infinity is not a JSON value"),
    ('{"n": 1e999}', "the number 1e999 is out of range"),
    ('{"n": "\\ud800"}', "unpaired UTF-16 surrogate"),
    ('{"\\udc00": 1}', "unpaired UTF-16 surrogate"),
    ('{"n": 1', "malformed JSON: Expecting ',' delimiter"),
]


@pytest.mark.parametrize(("text", "needle"), REFUSED)
def test_load_json_refuses_with_one_line(text: str, needle: str) -> None:
    for raw in (text, text.encode()):
        with pytest.raises(BadJSON) as err:
            load_json(raw, "request")
        msg = str(err.value)
        assert msg.startswith("request: ") and needle in msg and "\n" not in msg, msg
        assert isinstance(err.value, InputError)  # exit 2 on the CLI


def test_load_json_accepts_json() -> None:
    deep: object = 1
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert load_json(json.dumps(deep), "x") == deep
    assert load_json('["[[[[" , "{{{{", "\\\\ud800", "\\ud83d\\ude00"]', "x") == ["[[[[", "{{{{", "\\ud800", "😀"]
    assert load_json(b'\xef\xbb\xbf{"a": 1}'.decode("utf-8-sig").encode("utf-16"), "x") == {"a": 1}  # RFC 8259
    assert load_json('{"n": ' + "9" * 100 + ', "f": 1.5e300}', "x") == {"n": int("9" * 100), "f": 1.5e300}
    with pytest.raises(BadJSON, match="not UTF-8"):
        load_json(b'{"a": "\xff"}', "x")


def test_load_json_stays_fast_on_large_batches() -> None:
    """The depth bound is counted without recursion: a 1 MB body of 100,000 brackets, or a
    SendGrid batch of 4,000 events, costs milliseconds (bound generous for a loaded machine)."""
    batch = json.dumps([{"event": "open", "email": f"u{i}@example.com", "n": i} for i in range(4000)])
    hostile = "[" * 500_000 + "]" * 500_000
    started = time.perf_counter()
    assert len(load_json(batch, "x")) == 4000
    with pytest.raises(BadJSON):
        load_json(hostile, "x")
    assert time.perf_counter() - started < 5


def test_cli_entry_points_use_the_loader(ctx: Context, tmp_path: Path) -> None:
    seed(ctx)
    seg = tmp_path / "seg.csv"
    seg.write_text("user_id\nalice\n", encoding="utf-8")
    before = snapshot(ctx)
    for text, needle in REFUSED:
        for args, stdin, what in [
            (["send", "-f", "-"], text, "request: "),
            (["send", "alice", "-t", "otp_code", "--data-json", text], None, "--data-json: "),
            (["campaign", "launch", "-t", "weekly_promo", "--segment-csv", str(seg), "--data-json", text], None,
             "--data-json: "),
            (["templates", "render", "otp_code", "--data", text], None, "--data: "),
        ]:  # fmt: skip
            res = runner.invoke(cli_app, args, input=stdin, env=cli_env(ctx.settings))
            lines = [line for line in res.stderr.splitlines() if line.strip()]  # campaign prints a blank line first
            assert res.exit_code == 2, (args[:2], text[:30], res.stderr[-300:])
            assert len(lines) == 1 and lines[0].startswith("error: " + what), (args[:2], lines)
            assert needle.split(" (")[0] in lines[0], (args[:2], lines)
    assert snapshot(ctx) == before


@pytest.mark.parametrize(("text", "needle"), REFUSED)
def test_sandbox_fault_json_uses_the_loader(text: str, needle: str) -> None:
    """`notifyctl sandbox --fault SANDBOX:JSON`: a 5,000-digit number was an AttributeError, deep
    nesting a RecursionError."""
    from sandboxes.sandbox_set import parse_fault

    with pytest.raises(InputError) as err:
        parse_fault("apns:" + text)
    assert str(err.value).startswith("--fault apns: ") and needle.split(" (")[0] in str(err.value)
