"""SES v2 (email) and SNS (SMS) providers against the AWS sandbox: moto's server behind a
SigV4-checking fault proxy, over real TCP. One sandbox for the whole module (moto is slow to import)."""

from __future__ import annotations

from typing import Any

import pytest

from notifyctl.settings import Settings
from sandboxes.aws import AwsSandbox
from worker.providers import ses, sns
from worker.providers.base import InvalidAddress, Message, Misconfigured, Permanent, Retry, Sent

KEY_ID = "AKIASANDBOXTEST0001"
SECRET = "sandbox-secret-Zq9vX2"
FROM = "notifications@example.com"


@pytest.fixture(scope="module")
def sandbox():
    sb = AwsSandbox(access_key_id=KEY_ID, secret_access_key=SECRET).start()
    sb.verify_identity("example.com")
    yield sb
    sb.stop()


@pytest.fixture(autouse=True)
def _clean(sandbox):
    sandbox.faults.clear()
    sandbox.recorder.clear()
    sandbox.bulk_calls.clear()
    yield
    sandbox.faults.clear()


def make_settings(tmp_path: Any, name: str, sandbox: AwsSandbox, **options: Any) -> Settings:
    opts = {
        "endpoint_url": sandbox.url,
        "access_key_id": KEY_ID,
        "secret_access_key": SECRET,
        "region": "us-east-1",
        **options,
    }
    return Settings(home=tmp_path, email_from=FROM, provider_options={name: opts})


@pytest.fixture(scope="module")
def ses_provider(sandbox, tmp_path_factory):
    p = ses.Provider(make_settings(tmp_path_factory.mktemp("ses"), "ses", sandbox))
    yield p
    p.close()


@pytest.fixture(scope="module")
def sns_provider(sandbox, tmp_path_factory):
    p = sns.Provider(make_settings(tmp_path_factory.mktemp("sns"), "sns", sandbox, sender_id="Acme"))
    yield p
    p.close()


def email(to: str = "bob@example.org", delivery_id: str = "d-1", **content: str) -> Message:
    return Message(
        delivery_id=delivery_id,
        notification_id="n-1",
        channel="email",
        route="email",
        address=to,
        content={"subject": "Your receipt", "text": "plain body", "html": "<p>html body</p>", **content},
        category="transactional",
        priority="normal",
        headers={"List-Unsubscribe": "<mailto:unsub@example.com>"},
    )


def sms(to: str = "+15555550100", category: str = "transactional", delivery_id: str = "s-1") -> Message:
    return Message(
        delivery_id=delivery_id,
        notification_id="n-2",
        channel="sms",
        route="sms",
        address=to,
        content={"text": "Your code is 123456"},
        category=category,
        priority="high",
    )


# --------------------------------------------------------------------------------------------
# SES
# --------------------------------------------------------------------------------------------


def test_ses_send_is_recorded_by_moto_with_subject_body_headers_tags(sandbox, ses_provider):
    m = email(delivery_id="dlv.42:x@y")
    m.headers["X-Campaign"] = "Été"
    [outcome] = ses_provider.send([m])

    assert isinstance(outcome, Sent)
    moto = {e["id"]: e for e in sandbox.sent_emails()}
    assert moto[outcome.provider_message_id]["subject"] == "Your receipt"
    assert moto[outcome.provider_message_id]["body"] == "<p>html body</p>"
    assert moto[outcome.provider_message_id]["destinations"] == {"ToAddresses": ["bob@example.org"]}
    [rec] = sandbox.recorder.all()
    assert rec["message_id"] == outcome.provider_message_id
    assert rec["from"] == FROM and rec["to"] == ["bob@example.org"]
    assert rec["text"] == "plain body"
    assert rec["headers"]["List-Unsubscribe"] == "<mailto:unsub@example.com>"
    assert rec["headers"]["X-Campaign"] == "=?utf-8?b?w4l0w6k=?="  # RFC 2047: SES wants ASCII
    assert rec["tags"] == {"delivery_id": "dlv_42_x_y", "notification_id": "n-1", "category": "transactional"}
    assert rec["configuration_set"] is None


def test_ses_configuration_set_and_from_address_from_config(sandbox, tmp_path):
    p = ses.Provider(
        make_settings(tmp_path, "ses", sandbox, configuration_set="events", from_address="Acme <acme@example.com>")
    )
    try:
        [outcome] = p.send([email()])
    finally:
        p.close()
    assert isinstance(outcome, Sent)
    [rec] = sandbox.recorder.all()
    assert rec["configuration_set"] == "events"
    assert rec["from"] == "Acme <acme@example.com>"


SES_ERRORS = [
    # (code, status, message, extra headers, expected outcome type, expected retry_after)
    ("TooManyRequestsException", 429, "Too many requests", {"Retry-After": "7"}, Retry, 7.0),
    ("TooManyRequestsException", 429, "Too many requests", {}, Retry, None),
    ("Throttling", 400, "Maximum sending rate exceeded.", {}, Retry, None),
    ("LimitExceededException", 400, "Limit exceeded", {}, Retry, None),
    ("ServiceUnavailable", 503, "Service unavailable", {}, Retry, None),
    ("InternalFailure", 500, "Internal failure", {}, Retry, None),
    ("SomethingNew", 502, "Bad gateway", {}, Retry, None),
    ("Throttling", 400, "Daily message quota exceeded.", {}, Retry, 3600.0),
    ("MessageRejected", 400, "Email address is not verified.", {}, Permanent, None),
    ("MailFromDomainNotVerifiedException", 400, "MAIL FROM domain not verified", {}, Permanent, None),
    ("BadRequestException", 400, "Subject must not be empty", {}, Permanent, None),
    ("AccountSuspendedException", 400, "Account suspended", {}, Permanent, None),
    ("SendingPausedException", 400, "Sending paused", {}, Permanent, None),
    ("NotFoundException", 404, "Configuration set <events> does not exist.", {}, Permanent, None),
    ("AccessDeniedException", 403, "not authorized to perform ses:SendEmail", {}, Permanent, None),
    ("BadRequestException", 400, "Illegal address", {}, InvalidAddress, None),
    ("BadRequestException", 400, "Missing final '@domain'", {}, InvalidAddress, None),
]


@pytest.mark.parametrize(("code", "status", "message", "headers", "kind", "retry_after"), SES_ERRORS)
def test_ses_error_mapping(sandbox, ses_provider, code, status, message, headers, kind, retry_after):
    sandbox.faults.add({"code": code, "status": status, "message": message, "headers": headers})
    [outcome] = ses_provider.send([email()])

    assert type(outcome) is kind, outcome
    assert code in outcome.reason
    if kind is Retry:
        assert outcome.retry_after == retry_after
    assert sandbox.recorder.all() == []
    # exactly one attempt: the pipeline owns retries, so botocore must not have retried
    [after] = ses_provider.send([email()])
    assert isinstance(after, Sent)


def test_ses_raw_5xx_without_aws_body_is_retry(sandbox, ses_provider):
    sandbox.faults.add({"status": 500, "body": "<html>oops</html>", "headers": {"Content-Type": "text/html"}})
    [outcome] = ses_provider.send([email()])
    assert isinstance(outcome, Retry)


def test_ses_invalid_recipient_reported_by_moto_is_invalid_address(ses_provider):
    [outcome] = ses_provider.send([email(to="not-an-address")])
    assert isinstance(outcome, InvalidAddress), outcome


def test_ses_unverified_sender_is_permanent(sandbox, tmp_path):
    p = ses.Provider(make_settings(tmp_path, "ses", sandbox, from_address="x@unverified.test"))
    try:
        [outcome] = p.send([email()])
        problem = p.check()
    finally:
        p.close()
    assert isinstance(outcome, Permanent) and "MessageRejected" in outcome.reason
    assert problem is not None and "unverified.test" in problem


def test_ses_dropped_connection_and_timeout_are_retry(sandbox, tmp_path):
    p = ses.Provider(make_settings(tmp_path, "ses", sandbox, timeout=0.3))
    try:
        sandbox.faults.add({"drop": True})
        [dropped] = p.send([email()])
        sandbox.faults.add({"delay": 0.8, "status": 200, "body": "{}"})
        [timed_out] = p.send([email()])
    finally:
        p.close()
    assert isinstance(dropped, Retry) and "network" in dropped.reason
    assert isinstance(timed_out, Retry) and "network" in timed_out.reason


@pytest.mark.parametrize(
    ("key_id", "secret", "code"),
    [
        (KEY_ID, "wrong-secret", "SignatureDoesNotMatch"),
        ("AKIAUNKNOWNKEY000001", SECRET, "UnrecognizedClient"),
    ],
)
def test_ses_bad_credentials_are_permanent_and_check_reports_them(sandbox, tmp_path, key_id, secret, code):
    p = ses.Provider(make_settings(tmp_path, "ses", sandbox, access_key_id=key_id, secret_access_key=secret))
    try:
        [outcome] = p.send([email()])
        problem = p.check()
    finally:
        p.close()
    assert isinstance(outcome, Permanent) and code in outcome.reason
    assert problem is not None and code in problem
    assert sandbox.recorder.all() == []


def test_ses_check_passes_for_verified_domain(ses_provider, sandbox):
    assert ses_provider.check() is None
    assert sandbox.recorder.all() == []  # check sends nothing


def test_ses_batch_is_concurrent_and_in_order(sandbox, ses_provider):
    n = 16
    sandbox.faults.add({"delay": 0.25, "count": n, "match": "outbound-emails"})  # slow, then pass through
    sandbox.reset_peak()
    # distinct content: each message goes through its own SendEmail call
    batch = [email(to=f"user{i}@example.org", delivery_id=f"d{i}", subject=f"Receipt {i}") for i in range(n)]
    outcomes = ses_provider.send(batch)

    assert all(isinstance(o, Sent) for o in outcomes)
    assert sandbox.peak_in_flight >= 8  # counted at the sandbox: sequential calls would peak at 1
    by_id = {r["message_id"]: r for r in sandbox.recorder.all()}
    for i, o in enumerate(outcomes):
        assert by_id[o.provider_message_id]["to"] == [f"user{i}@example.org"]
        assert by_id[o.provider_message_id]["tags"]["delivery_id"] == f"d{i}"


def test_ses_batch_mixed_outcomes_keep_order(sandbox, ses_provider):
    sandbox.faults.add({"code": "MessageRejected", "status": 400, "message": "nope", "match": "bad@example.org"})
    outcomes = ses_provider.send(
        [
            email(to="a@example.org", subject="a"),
            email(to="bad@example.org", subject="b"),
            email(to="c@example.org", subject="c"),
        ]
    )
    assert [type(o) for o in outcomes] == [Sent, Permanent, Sent]
    assert sandbox.bulk_calls.all() == []
    assert sorted(r["to"][0] for r in sandbox.recorder.all()) == ["a@example.org", "c@example.org"]


def test_ses_empty_body_is_permanent_without_a_call(sandbox, ses_provider):
    [outcome] = ses_provider.send([email(text="", html="")])
    assert isinstance(outcome, Permanent)
    assert ses_provider.send([]) == []
    assert sandbox.recorder.all() == []


def test_ses_describe_masks_secrets(ses_provider):
    shown = ses_provider.describe()
    text = repr(shown) + repr(ses_provider.config) + str(ses_provider.config)
    assert SECRET not in text
    assert KEY_ID not in repr(shown)
    assert shown["access_key_id"] == "****0001"
    assert shown["secret_access_key"] == "(set)"
    assert shown["endpoint_url"].startswith("http://127.0.0.1:")
    assert shown["from_address"] == FROM
    assert shown["bulk"] == "on, 50/call"


@pytest.mark.parametrize(
    "options",
    [
        {"secret_access_key": None},
        {"from_address": "no-at-sign"},
        {"concurrency": 0},
        {"endpoint_url": "ftp://example"},
    ],
)
def test_ses_misconfigured(sandbox, tmp_path, options):
    with pytest.raises(Misconfigured) as info:
        ses.Provider(make_settings(tmp_path, "ses", sandbox, **options))
    assert SECRET not in str(info.value)


# --------------------------------------------------------------------------------------------
# SES SendBulkEmail (identical content)
# --------------------------------------------------------------------------------------------

PROMO = {"subject": "Spring sale", "text": "20% off everything", "html": "<p>20% off everything</p>"}


def promo(i: int, **content: str) -> Message:
    """Identical content, per-user List-Unsubscribe URL (as the pipeline renders marketing mail)."""
    m = email(to=f"user{i}@example.org", delivery_id=f"d{i}", **{**PROMO, **content})
    m.category = "marketing"
    m.headers = {
        "List-Unsubscribe": f"<https://example.com/u/{i}>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
    }
    return m


def test_ses_bulk_120_identical_messages_take_three_calls(sandbox, ses_provider):
    outcomes = ses_provider.send([promo(i) for i in range(120)])

    assert all(isinstance(o, Sent) for o in outcomes), outcomes
    assert len({o.provider_message_id for o in outcomes}) == 120
    calls = sandbox.bulk_calls.all()
    assert sorted(c["entries"] for c in calls) == [20, 50, 50]
    assert all(c["status"] == 200 for c in calls)
    # the wire request: inline template content, shared header in the template, per-user one per entry
    req = calls[0]["request"]
    template = req["DefaultContent"]["Template"]
    assert "TemplateName" not in template
    assert template["TemplateContent"] == {"Subject": "Spring sale", "Text": PROMO["text"], "Html": PROMO["html"]}
    assert template["Headers"] == [{"Name": "List-Unsubscribe-Post", "Value": "List-Unsubscribe=One-Click"}]
    entry = req["BulkEmailEntries"][0]
    assert [h["Name"] for h in entry["ReplacementHeaders"]] == ["List-Unsubscribe"]
    assert req["FromEmailAddress"] == FROM
    assert sandbox.recorder.all() and all(r["bulk"] for r in sandbox.recorder.all())
    # each message went to its own recipient with its own headers and tags
    by_id = {r["message_id"]: r for r in sandbox.recorder.all()}
    assert len(by_id) == 120
    for i, o in enumerate(outcomes):
        rec = by_id[o.provider_message_id]
        assert rec["to"] == [f"user{i}@example.org"]
        assert rec["tags"] == {"delivery_id": f"d{i}", "notification_id": "n-1", "category": "marketing"}
        assert rec["headers"] == {
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "List-Unsubscribe": f"<https://example.com/u/{i}>",
        }
        assert (rec["subject"], rec["text"], rec["html"]) == (PROMO["subject"], PROMO["text"], PROMO["html"])
    moto = {e["id"]: e for e in sandbox.sent_emails()}
    assert all(moto[o.provider_message_id]["subject"] == "Spring sale" for o in outcomes)


#: (BulkEmailStatus, Error, outcome type, retry_after, throttled) — statuses from botocore's sesv2 model
BULK_STATUSES = [
    ("ACCOUNT_THROTTLED", "Maximum sending rate exceeded.", Retry, None, True),
    ("ACCOUNT_DAILY_QUOTA_EXCEEDED", "Daily message quota exceeded.", Retry, 3600.0, False),
    ("TRANSIENT_FAILURE", "Temporary failure", Retry, None, False),
    ("FAILED", "Unknown failure", Retry, None, False),
    ("MESSAGE_REJECTED", "Message contains a virus", Permanent, None, False),
    ("MAIL_FROM_DOMAIN_NOT_VERIFIED", "Domain not verified", Permanent, None, False),
    ("CONFIGURATION_SET_NOT_FOUND", "No such configuration set", Permanent, None, False),
    ("TEMPLATE_NOT_FOUND", "No such template", Permanent, None, False),
    ("ACCOUNT_SUSPENDED", "Account suspended", Permanent, None, False),
    ("INVALID_SENDING_POOL_NAME", "No such pool", Permanent, None, False),
    ("ACCOUNT_SENDING_PAUSED", "Sending paused", Permanent, None, False),
    ("CONFIGURATION_SET_SENDING_PAUSED", "Sending paused for the set", Permanent, None, False),
    ("INVALID_PARAMETER", "Illegal address", InvalidAddress, None, False),
    ("INVALID_PARAMETER", "Invalid tag value", Permanent, None, False),
]


def test_ses_bulk_entry_results_map_to_outcomes_in_order(sandbox, ses_provider):
    n = len(BULK_STATUSES)
    for i, (status, error, *_) in enumerate(BULK_STATUSES):
        sandbox.faults.add({"entry_status": status, "error": error, "match": f'"user{i}@example.org"'})
    batch = [promo(i) for i in range(n)] + [promo(n), promo(0, text="x", html="")]
    batch[-1].address = "not-an-address"  # moto refuses it: that entry alone is INVALID_PARAMETER
    batch[-2].content = dict(batch[0].content)
    batch[-1].content = dict(batch[0].content)
    outcomes = ses_provider.send(batch)

    assert [c["entries"] for c in sandbox.bulk_calls.all()] == [n + 2]  # one call, no fallback
    for (status, error, kind, retry_after, throttled), outcome in zip(BULK_STATUSES, outcomes, strict=False):
        assert type(outcome) is kind, (status, outcome)
        assert status in outcome.reason and error in outcome.reason
        if kind is Retry:
            assert (outcome.retry_after, outcome.throttled) == (retry_after, throttled)
    assert isinstance(outcomes[n], Sent)
    assert isinstance(outcomes[n + 1], InvalidAddress) and "INVALID_PARAMETER" in outcomes[n + 1].reason
    assert [r["to"] for r in sandbox.recorder.all()] == [[f"user{n}@example.org"]]
    assert sandbox.faults.pending() == 0


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ({"code": "TooManyRequestsException", "status": 429, "message": "Too many requests"}, Retry),
        ({"code": "InternalFailure", "status": 500, "message": "oops"}, Retry),
        ({"code": "AccountSuspendedException", "status": 400, "message": "suspended"}, Permanent),
        ({"drop": True}, Retry),
    ],
)
def test_ses_bulk_whole_call_error_applies_to_every_entry(sandbox, ses_provider, fault, kind):
    sandbox.faults.add({**fault, "match": "outbound-bulk-emails"})
    outcomes = ses_provider.send([promo(i) for i in range(3)])
    assert [type(o) for o in outcomes] == [kind] * 3
    assert outcomes[0] == outcomes[1] == outcomes[2]
    if fault.get("status") == 429:
        assert outcomes[0].throttled
    assert sandbox.recorder.all() == []


def test_ses_bulk_call_refused_over_an_address_falls_back_to_one_by_one(sandbox, ses_provider):
    sandbox.faults.add({"code": "BadRequestException", "message": "Illegal address", "match": "outbound-bulk-emails"})
    batch = [promo(i) for i in range(3)]
    batch[1].address = "not-an-address"
    outcomes = ses_provider.send(batch)
    assert [type(o) for o in outcomes] == [Sent, InvalidAddress, Sent]
    recs = sandbox.recorder.all()
    assert sorted(r["to"][0] for r in recs) == ["user0@example.org", "user2@example.org"]
    assert not any(r["bulk"] for r in recs)


def test_ses_bulk_unverified_sender_is_permanent(sandbox, tmp_path):
    p = ses.Provider(make_settings(tmp_path, "ses", sandbox, from_address="x@unverified.test"))
    try:
        outcomes = p.send([promo(i) for i in range(2)])
    finally:
        p.close()
    assert all(isinstance(o, Permanent) and "MessageRejected" in o.reason for o in outcomes)
    assert [c["status"] for c in sandbox.bulk_calls.all()] == [400]


def test_ses_mixed_batch_uses_bulk_and_single_sends(sandbox, ses_provider):
    batch = [
        promo(0),
        email(to="solo1@example.org", subject="Only you"),
        promo(1),
        promo(2, subject="Other subject"),
        promo(3),
        email(to="curly@example.org", subject="{{not a var}}"),
        promo(4),
    ]
    outcomes = ses_provider.send(batch)

    assert all(isinstance(o, Sent) for o in outcomes), outcomes
    # the marketing mail is one call, the one with its own subject included (issue 15: what differs
    # per recipient keeps the batch batched); the lone transactional one and the one with braces alone
    [call] = sandbox.bulk_calls.all()
    assert [e["Destination"]["ToAddresses"][0] for e in call["request"]["BulkEmailEntries"]] == [
        f"user{i}@example.org" for i in (0, 1, 2, 3, 4)
    ]
    assert call["request"]["DefaultContent"]["Template"]["TemplateContent"]["Subject"] != "Spring sale"  # a key
    by_id = {r["message_id"]: r for r in sandbox.recorder.all()}
    assert [by_id[o.provider_message_id]["bulk"] for o in outcomes] == [True, False, True, True, True, False, True]
    assert [by_id[o.provider_message_id]["to"][0] for o in outcomes] == [m.address for m in batch]
    assert [by_id[o.provider_message_id]["subject"] for o in outcomes] == [m.content["subject"] for m in batch]
    assert by_id[outcomes[5].provider_message_id]["subject"] == "{{not a var}}"


@pytest.mark.parametrize(
    "content",
    [{"text": "Hi {{name}}, welcome"}, {"html": "<p>{{#if x}}y{{/if}}</p>"}, {"subject": "Use {{code}}"}],
)
def test_ses_content_with_braces_falls_back_to_send_email(sandbox, ses_provider, content):
    outcomes = ses_provider.send([promo(i, **content) for i in range(3)])

    assert all(isinstance(o, Sent) for o in outcomes), outcomes
    assert sandbox.bulk_calls.all() == []
    recs = sandbox.recorder.all()
    assert len(recs) == 3 and not any(r["bulk"] for r in recs)
    for key, value in content.items():
        assert all(r[key] == value for r in recs)  # verbatim: no template substitution happened


def test_ses_header_with_braces_falls_back_to_send_email(sandbox, ses_provider):
    batch = [promo(i) for i in range(2)]
    batch[0].headers["X-Note"] = "{{x}}"
    batch[1].headers["X-Note"] = "{{x}}"
    assert all(isinstance(o, Sent) for o in ses_provider.send(batch))
    assert sandbox.bulk_calls.all() == []


def test_ses_bulk_off_and_bulk_size_settings(sandbox, tmp_path):
    off = ses.Provider(make_settings(tmp_path, "ses", sandbox, bulk=False))
    small = ses.Provider(make_settings(tmp_path, "ses", sandbox, bulk_size=10))
    try:
        assert all(isinstance(o, Sent) for o in off.send([promo(i) for i in range(4)]))
        assert sandbox.bulk_calls.all() == [] and len(sandbox.recorder) == 4
        assert off.describe()["bulk"] == "off"
        assert all(isinstance(o, Sent) for o in small.send([promo(i) for i in range(25)]))
    finally:
        off.close()
        small.close()
    assert sorted(c["entries"] for c in sandbox.bulk_calls.all()) == [5, 10, 10]


def test_sandbox_bulk_renders_templates_and_enforces_ses_limits(sandbox):
    """The sandbox's SendBulkEmail does what SES does with templates, so the fallback above matters."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.session.Session().client(
        "sesv2",
        region_name="us-east-1",
        endpoint_url=sandbox.url,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    try:
        entry = {
            "Destination": {"ToAddresses": ["a@example.org"]},
            "ReplacementEmailContent": {"ReplacementTemplate": {"ReplacementTemplateData": '{"name": "Ann"}'}},
        }
        resp = client.send_bulk_email(
            FromEmailAddress=FROM,
            DefaultContent={
                "Template": {
                    "TemplateContent": {"Subject": "Hi {{name}}", "Text": "{{greeting}}!"},
                    "TemplateData": '{"name": "you", "greeting": "Hello"}',
                }
            },
            BulkEmailEntries=[entry],
        )
        [result] = resp["BulkEmailEntryResults"]
        assert result["Status"] == "SUCCESS"
        [rec] = sandbox.recorder.all()
        assert (rec["subject"], rec["text"]) == ("Hi Ann", "Hello!")
        problems = [
            ({"TemplateContent": {"Subject": "s", "Text": "{{#if a}}b{{/if}}"}}, [entry], "unsupported operations"),
            ({"TemplateContent": {"Subject": "s", "Text": "t"}}, [entry] * 51, "Too many entries"),
            ({"TemplateName": "nope"}, [entry], "does not exist"),
        ]
        for template, entries, message in problems:
            with pytest.raises(ClientError) as info:
                client.send_bulk_email(
                    FromEmailAddress=FROM, DefaultContent={"Template": template}, BulkEmailEntries=entries
                )
            assert message in str(info.value)
    finally:
        client.close()


# --------------------------------------------------------------------------------------------
# SNS
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("category", "sms_type"),
    [("transactional", "Transactional"), ("alerts", "Transactional"), ("marketing", "Promotional")],
)
def test_sns_publish_sets_sms_type_by_category(sandbox, sns_provider, category, sms_type):
    [outcome] = sns_provider.send([sms(category=category)])

    assert isinstance(outcome, Sent)
    [rec] = sandbox.recorder.all()
    assert rec["message_id"] == outcome.provider_message_id
    assert rec["phone"] == "+15555550100" and rec["text"] == "Your code is 123456"
    assert rec["attributes"] == {"AWS.SNS.SMS.SMSType": sms_type, "AWS.SNS.SMS.SenderID": "Acme"}
    moto = {s["message_id"]: s for s in sandbox.sent_sms()}
    assert moto[outcome.provider_message_id]["phone_number"] == "+15555550100"
    assert moto[outcome.provider_message_id]["message"] == "Your code is 123456"


SNS_ERRORS = [
    ("Throttled", 400, "Rate exceeded", Retry),
    ("ThrottlingException", 400, "Rate exceeded", Retry),
    ("InternalError", 500, "Internal error", Retry),
    ("ServiceUnavailable", 503, "Unavailable", Retry),
    (
        "InvalidParameter",
        400,
        "Invalid parameter: PhoneNumber Reason: +15555550100 is not valid",
        InvalidAddress,
    ),
    ("ParameterValueInvalid", 400, "Invalid phone number", InvalidAddress),
    ("InvalidParameter", 400, "Invalid parameter: MessageAttributes", Permanent),
    ("OptedOut", 400, "Phone number is opted out", InvalidAddress),
    ("AuthorizationError", 403, "User is not authorized to perform: SNS:Publish", Permanent),
    ("KMSThrottling", 400, "KMS throttled", Retry),
]


@pytest.mark.parametrize(("code", "status", "message", "kind"), SNS_ERRORS)
def test_sns_error_mapping(sandbox, sns_provider, code, status, message, kind):
    sandbox.faults.add({"code": code, "status": status, "message": message, "match": "Action=Publish"})
    [outcome] = sns_provider.send([sms()])

    assert type(outcome) is kind, outcome
    assert code in outcome.reason
    if code == "OptedOut":
        assert "opted out" in outcome.reason
    assert sandbox.recorder.all() == []
    [after] = sns_provider.send([sms()])  # one attempt only: the fault was used once
    assert isinstance(after, Sent)


def test_sns_retry_after_header_is_honoured(sandbox, sns_provider):
    sandbox.faults.add({"code": "Throttled", "status": 429, "message": "slow down", "headers": {"Retry-After": "3"}})
    [outcome] = sns_provider.send([sms()])
    assert outcome == Retry("Throttled: slow down", 3.0, throttled=True)


def test_sns_non_e164_number_is_invalid_address_without_a_call(sandbox, sns_provider):
    sandbox.reset_peak()
    outcomes = sns_provider.send([sms(to="5555550100"), sms(to="+1 555 555"), sms(to="+15555550101")])
    assert [type(o) for o in outcomes] == [InvalidAddress, InvalidAddress, Sent]
    assert [r["phone"] for r in sandbox.recorder.all()] == ["+15555550101"]


def test_sns_bad_secret_is_permanent(sandbox, tmp_path):
    p = sns.Provider(make_settings(tmp_path, "sns", sandbox, secret_access_key="wrong"))
    try:
        [outcome] = p.send([sms()])
        problem = p.check()
    finally:
        p.close()
    assert isinstance(outcome, Permanent) and "SignatureDoesNotMatch" in outcome.reason
    assert problem is not None and "SignatureDoesNotMatch" in problem


def test_sns_check_and_describe(sns_provider, sandbox):
    assert sns_provider.check() is None
    shown = sns_provider.describe()
    assert SECRET not in repr(shown)
    assert shown["sender_id"] == "Acme"
    assert sandbox.recorder.all() == []


def test_sns_batch_is_concurrent(sandbox, sns_provider):
    n = 12
    sandbox.faults.add({"delay": 0.25, "count": n, "match": "Action=Publish"})
    sandbox.reset_peak()
    outcomes = sns_provider.send([sms(to=f"+1555555{i:04d}", delivery_id=f"s{i}") for i in range(n)])
    assert all(isinstance(o, Sent) for o in outcomes)
    assert sandbox.peak_in_flight >= 6
    by_id = {r["message_id"]: r["phone"] for r in sandbox.recorder.all()}
    assert [by_id[o.provider_message_id] for o in outcomes] == [f"+1555555{i:04d}" for i in range(n)]


@pytest.mark.parametrize("options", [{"sender_id": "TooLongSender1"}, {"origination_number": "12345"}])
def test_sns_misconfigured(sandbox, tmp_path, options):
    with pytest.raises(Misconfigured):
        sns.Provider(make_settings(tmp_path, "sns", sandbox, **options))
