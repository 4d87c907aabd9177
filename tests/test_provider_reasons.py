"""Reasons stored on deliveries are one short line (``error_text``), and SES bulk falls back to
SendEmail when SendBulkEmail itself is refused (issue 15, item 2): against moto's own server, which
lacks the operation, and against the AWS sandbox refusing it as an IAM policy would."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from notifyctl.settings import Settings
from sandboxes.aws import AwsSandbox
from sandboxes.sendgrid import DEFAULT_API_KEY, SendgridSandbox
from tests.bulk_email import message
from worker.providers import sendgrid, ses
from worker.providers.base import Message, Permanent, Retry, Sent, error_text

FROM = "notifications@example.com"
HTML_404 = (
    "<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
    "<p>The requested URL was not found on the server.</p>\n"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (HTML_404, "404 Not Found"),
        ("<html><body><h1>502 Bad\n Gateway</h1><p>nginx &amp; co</p></body></html>", "502 Bad Gateway nginx & co"),
        ("Invalid address\r\n  on line 2", "Invalid address on line 2"),
        (b"bytes <too>", "bytes <too>"),  # angle brackets that are not an HTML page are kept
        (None, ""),
        ("x" * 500, "x" * 199 + "…"),
    ],
)
def test_error_text_is_one_short_line(raw: Any, expected: str) -> None:
    out = error_text(raw)
    assert out == expected
    assert "\n" not in out and len(out) <= 200


def email(i: int, body: str = "same body") -> Message:
    content = {"subject": "Weekly", "text": body, "html": f"<p>{body}</p>"}
    headers = {"List-Unsubscribe": f"<https://example.com/u/{i}>"}
    return message(i, content, "marketing", headers=headers, priority="normal")


@pytest.fixture
def moto_server():
    """moto's own server (SES v2 without SendBulkEmail), reset, with example.com verified (the From)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # moto's backends are per process, not per server: start from none of the messages other
    # tests of this session sent through moto
    import httpx

    httpx.post(f"http://{host}:{port}/moto-api/reset").raise_for_status()
    moto = boto3.client(
        "sesv2",
        region_name="us-east-1",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id="AKIAMOTO",
        aws_secret_access_key="x",
    )
    moto.create_email_identity(EmailIdentity="example.com")
    yield f"http://{host}:{port}"
    server.stop()


def test_ses_on_moto_without_send_bulk_email_delivers_every_message_through_send_email(
    moto_server: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        home=tmp_path,
        email_from=FROM,
        provider_options={
            "ses": {"endpoint_url": moto_server, "access_key_id": "AKIAMOTO", "secret_access_key": "x", "bulk_size": 4}
        },
    )
    ses.client._warned_bulk_refused = False
    provider = ses.Provider(settings)
    try:
        with caplog.at_level(logging.WARNING, logger="worker.providers.ses"):
            first = provider.send([email(i) for i in range(10)])  # 3 bulk chunks, each refused (404)
            second = provider.send([email(i) for i in range(10, 14)])  # within bulk_reprobe: no bulk try
        assert all(isinstance(o, Sent) for o in first + second), first + second
        refusals = [r for r in caplog.records if "SendBulkEmail" in r.getMessage()]
        assert len(refusals) == 1  # one warning per process
        assert provider.bulk_refused_until > time.monotonic() + 800  # re-probed after 900 s by default
        import httpx

        mails = httpx.get(f"{moto_server}/moto-api/data.json").json()["ses"]["Message"]  # what moto sent
        assert sorted(d for m in mails for d in m["destinations"]["ToAddresses"]) == sorted(
            f"user{i}@example.org" for i in range(14)
        )
    finally:
        provider.close()


def test_ses_bulk_refused_by_iam_falls_back_and_reprobes(tmp_path: Any) -> None:
    key, secret = "AKIASANDBOXTEST0002", "sandbox-secret-2"
    sb = AwsSandbox(access_key_id=key, secret_access_key=secret).start()
    try:
        sb.verify_identity("example.com")
        opts = {"endpoint_url": sb.url, "access_key_id": key, "secret_access_key": secret, "bulk_reprobe": 0.2}
        provider = ses.Provider(Settings(home=tmp_path, email_from=FROM, provider_options={"ses": opts}))
        denied = "User: arn:aws:iam::1:user/app is not authorized to perform: ses:SendBulkEmail"
        sb.faults.add({"status": 403, "code": "AccessDeniedException", "message": denied, "match": "outbound-bulk"})
        out = provider.send([email(i) for i in range(3)])
        assert all(isinstance(o, Sent) for o in out), out
        assert [r["bulk"] for r in sb.recorder.all()] == [False] * 3  # the refused call reached no entry
        deadline = time.monotonic() + 5
        while time.monotonic() < provider.bulk_refused_until and time.monotonic() < deadline:
            time.sleep(0.05)
        out = provider.send([email(i) for i in range(3, 6)])  # re-probed: bulk works again
        assert all(isinstance(o, Sent) for o in out), out
        assert [r["status"] for r in sb.bulk_calls.all()] == [200]
        assert [r["bulk"] for r in sb.recorder.all()][3:] == [True] * 3
        # an ordinary refusal of the content is not a fallback: one short line, not retried singly
        sb.faults.add({"status": 400, "code": "MessageRejected", "message": "Email address is not verified.\n<br>"})
        out = provider.send([email(i) for i in range(6, 8)])
        assert out == [Permanent("MessageRejected: Email address is not verified. <br>")] * 2
        provider.close()
    finally:
        sb.stop()


def test_sendgrid_html_error_page_is_stored_as_one_line(tmp_path: Any) -> None:
    sb = SendgridSandbox(api_key=DEFAULT_API_KEY).start()
    try:
        opts = {"api_key": DEFAULT_API_KEY, "base_url": sb.url}
        provider = sendgrid.Provider(Settings(home=tmp_path, email_from=FROM, provider_options={"sendgrid": opts}))
        sb.faults.add({"status": 418, "body": HTML_404, "headers": {"Content-Type": "text/html"}})
        out = provider.send([email(1)])
        assert out == [Permanent("sendgrid: HTTP 418: 404 Not Found")]
        sb.faults.add({"status": 503, "body": HTML_404})
        assert provider.send([email(2)]) == [Retry("sendgrid: server error 503")]
        provider.close()
    finally:
        sb.stop()
