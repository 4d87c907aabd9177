"""The SMTP provider against the aiosmtpd sandbox, over real TCP (and real TLS)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import urllib.request
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from notifyctl.settings import Settings
from sandboxes.smtp import SmtpSandbox
from worker.providers.base import InvalidAddress, Message, Misconfigured, Permanent, Retry, Sent
from worker.providers.smtp import Provider

PASSWORD = "s3cret-Pa55word-xyz"


@pytest.fixture
def sandbox():
    with SmtpSandbox() as sb:
        yield sb


@pytest.fixture
def make_provider(tmp_path: Path):
    made: list[Provider] = []

    def make(sb: SmtpSandbox | None = None, **options: object) -> Provider:
        opts: dict[str, object] = {"helo_name": "client.test", "timeout": 5}
        if sb is not None:
            opts.update(host=sb.host, port=sb.port)
        opts.update(options)
        settings = Settings(home=tmp_path, email_from="Acme <noreply@acme.test>", provider_options={"smtp": opts})
        p = Provider(settings)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def msg(i: int = 0, address: str | None = None, **kw: object) -> Message:
    fields: dict[str, object] = {
        "delivery_id": f"dlv-{i}",
        "notification_id": f"ntf-{i}",
        "channel": "email",
        "route": "email",
        "address": address or f"user{i}@example.com",
        "content": {"subject": f"Hello {i}", "text": f"plain body {i}", "html": f"<p>html body {i}</p>"},
        "category": "transactional",
        "priority": "normal",
    }
    fields.update(kw)
    return Message(**fields)  # type: ignore[arg-type]


# -- content ----------------------------------------------------------------------------------


def test_multipart_message_with_headers_arrives(sandbox, make_provider):
    p = make_provider(sandbox)
    m = msg(
        7,
        headers={
            "List-Unsubscribe": "<https://acme.test/u/abc>, <mailto:unsub@acme.test?subject=u-abc>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "Reply-To": "help@acme.test",
        },
    )
    [out] = p.send([m])
    assert isinstance(out, Sent)
    [rec] = sandbox.recorder.all()
    assert rec["mail_from"] == "noreply@acme.test"
    assert rec["rcpt_tos"] == ["user7@example.com"]
    assert rec["from"] == "Acme <noreply@acme.test>"
    assert rec["to"] == "user7@example.com"
    assert rec["subject"] == "Hello 7"
    assert rec["content_type"] == "multipart/alternative"
    assert rec["text"] == "plain body 7\n"
    assert rec["html"] == "<p>html body 7</p>\n"
    assert rec["delivery_id"] == "dlv-7"
    assert rec["message_id"] == f"<{out.provider_message_id}>"
    assert out.provider_message_id.endswith("@acme.test")
    h = rec["headers"]
    assert h["List-Unsubscribe"] == "<https://acme.test/u/abc>, <mailto:unsub@acme.test?subject=u-abc>"
    assert h["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert h["Reply-To"] == "help@acme.test"
    assert h["MIME-Version"] == "1.0"
    sent_at = parsedate_to_datetime(rec["date"])
    assert abs((datetime.datetime.now(datetime.UTC) - sent_at).total_seconds()) < 60


def test_non_ascii_long_lines_and_single_part(sandbox, make_provider):
    p = make_provider(sandbox, from_address="Zoë Café <noreply@acme.test>")
    long_line = "ä" * 1500
    text = "Grüße aus Köln\n.line starting with a dot\ntrailing spaces   \n" + long_line
    out = p.send(
        [
            msg(
                1,
                content={
                    "subject": "Ünïcode " + "very long subject " * 8,
                    "text": text,
                    "html": "<p>Grüße</p>",
                },
            ),
            msg(2, content={"subject": "html only", "html": "<b>only html</b>"}),
            msg(3, content={"subject": "text only", "text": "only text"}),
        ]
    )
    assert all(isinstance(o, Sent) for o in out), out
    recs = {r["delivery_id"]: r for r in sandbox.recorder.all()}
    assert recs["dlv-1"]["subject"] == "Ünïcode " + ("very long subject " * 8).strip()
    assert recs["dlv-1"]["text"] == text + "\n"
    assert recs["dlv-1"]["html"] == "<p>Grüße</p>\n"
    assert recs["dlv-1"]["from"] == "Zoë Café <noreply@acme.test>"
    assert recs["dlv-2"]["content_type"] == "text/html" and recs["dlv-2"]["html"] == "<b>only html</b>\n"
    assert recs["dlv-3"]["content_type"] == "text/plain" and recs["dlv-3"]["text"] == "only text\n"


def test_message_id_is_stable_per_delivery(sandbox, make_provider):
    p = make_provider(sandbox)
    a, b, c = p.send([msg(1), msg(1), msg(2, delivery_id="weird id/with spaces")])
    assert isinstance(a, Sent) and isinstance(b, Sent) and isinstance(c, Sent)
    assert a.provider_message_id == b.provider_message_id
    assert " " not in c.provider_message_id and "/" not in c.provider_message_id


def test_international_addresses(sandbox, make_provider):
    p = make_provider(sandbox)
    out = p.send([msg(1, address="jürgen@example.com"), msg(2, address="info@bücher.example")])
    assert all(isinstance(o, Sent) for o in out), out
    recs = {r["delivery_id"]: r for r in sandbox.recorder.all()}
    assert recs["dlv-1"]["rcpt_tos"] == ["jürgen@example.com"]
    assert "SMTPUTF8" in recs["dlv-1"]["mail_options"]
    assert recs["dlv-2"]["rcpt_tos"] == ["info@xn--bcher-kva.example"]
    assert "SMTPUTF8" not in recs["dlv-2"]["mail_options"]


@pytest.mark.parametrize("address", ["not-an-email", "a@b@c.com", "user@", "@example.com", "a b@c.com", "x@-bad-.com"])
def test_malformed_address_is_invalid_without_connecting(sandbox, make_provider, address):
    p = make_provider(sandbox)
    [out] = p.send([msg(1, address=address)])
    assert isinstance(out, InvalidAddress)
    assert sandbox.connections == 0


@pytest.mark.parametrize(
    "headers",
    [{"X-Evil": "a\r\nBcc: victim@example.com"}, {"Bad Name": "x"}, {"Subject": "override"}],
)
def test_bad_headers_are_permanent_and_do_not_sink_the_batch(sandbox, make_provider, headers):
    p = make_provider(sandbox)
    bad, good = p.send([msg(1, headers=headers), msg(2)])
    assert isinstance(bad, Permanent)
    assert isinstance(good, Sent)
    assert [r["delivery_id"] for r in sandbox.recorder.all()] == ["dlv-2"]


# -- outcomes ---------------------------------------------------------------------------------

REPLIES = [
    # stage, code, text, expected outcome
    ("rcpt", 421, "4.7.0 too many connections, closing", Retry),
    ("rcpt", 450, "4.2.1 mailbox busy", Retry),
    ("rcpt", 451, "4.3.0 try later", Retry),
    ("rcpt", 452, "4.5.3 too many recipients", Retry),
    ("rcpt", 550, "5.1.1 user unknown", InvalidAddress),
    ("rcpt", 550, "5.1.10 null MX", InvalidAddress),
    ("rcpt", 551, "5.1.6 mailbox has moved", InvalidAddress),
    ("rcpt", 553, "5.1.3 bad destination mailbox address syntax", InvalidAddress),
    ("rcpt", 550, "5.7.1 relaying denied", Permanent),
    ("rcpt", 550, "mailbox unavailable", Permanent),
    ("rcpt", 554, "5.7.1 rejected by policy", Permanent),
    ("rcpt", 552, "5.2.2 mailbox full", Retry),
    ("rcpt", 530, "5.7.0 Authentication required", Retry),
    ("mail", 451, "4.3.2 system not accepting messages", Retry),
    ("mail", 553, "5.1.8 bad sender address domain", Permanent),
    ("mail", 550, "5.1.1 sender unknown", Permanent),
    ("data", 451, "4.7.1 greylisted, come back later", Retry),
    ("data", 550, "5.1.1 user unknown", InvalidAddress),
    ("data", 552, "5.3.4 message too big", Permanent),
    ("data", 554, "5.7.1 message looks like spam", Permanent),
]


@pytest.mark.parametrize(("stage", "code", "text", "expected"), REPLIES)
def test_reply_codes_map_to_outcomes(sandbox, make_provider, stage, code, text, expected):
    p = make_provider(sandbox, connections=1)
    # MAIL faults can only match the sender: the first transaction gets it
    match = {} if stage == "mail" else {"match": "user1@"}
    sandbox.faults.add({"stage": stage, "smtp_code": code, "smtp_message": text, **match})
    failing, after = p.send([msg(1), msg(2)])
    assert isinstance(failing, expected), failing
    assert str(code) in failing.reason and text in failing.reason
    if isinstance(failing, Retry):
        assert failing.retry_after is None
    # the connection is left usable (RSET) or replaced (421): the next message goes through
    assert isinstance(after, Sent)
    assert [r["delivery_id"] for r in sandbox.recorder.all()] == ["dlv-2"]
    assert sandbox.connections == (2 if code == 421 else 1)


def test_one_failing_recipient_does_not_fail_the_batch(sandbox, make_provider):
    p = make_provider(sandbox, connections=3)
    sandbox.faults.add({"smtp_code": 550, "smtp_message": "5.1.1 user unknown", "match": "user4@"})
    sandbox.faults.add({"smtp_code": 451, "smtp_message": "4.3.0 try later", "match": "user7@"})
    out = p.send([msg(i) for i in range(10)])
    assert isinstance(out[4], InvalidAddress)
    assert isinstance(out[7], Retry)
    assert all(isinstance(o, Sent) for i, o in enumerate(out) if i not in (4, 7)), out
    delivered = sorted(r["delivery_id"] for r in sandbox.recorder.all())
    assert delivered == sorted(f"dlv-{i}" for i in range(10) if i not in (4, 7))


@pytest.mark.parametrize(
    "fault",
    [
        {"stage": "rcpt", "drop": True},
        {"stage": "data", "drop": True},
        {"stage": "mail", "drop": True},
        {"stage": "connect", "drop": True},
        {"stage": "connect", "smtp_code": 421, "smtp_message": "4.3.2 service not available"},
        {"stage": "connect", "smtp_code": 554, "smtp_message": "5.7.1 no SMTP service for you"},
        {"stage": "data", "delay": 2},
    ],
)
def test_broken_connections_mean_retry(sandbox, make_provider, fault):
    p = make_provider(sandbox, timeout=0.5, connections=1)
    sandbox.faults.add(fault)
    [out] = p.send([msg(1)])
    assert isinstance(out, Retry), out  # for the 2 s delay: only the 0.5 s timeout makes it a Retry
    assert sandbox.recorder.all() == []
    # and the provider recovers on the next call
    [again] = p.send([msg(2)])
    assert isinstance(again, Sent), again


def test_server_down_means_retry_for_the_whole_batch(make_provider, closed_port):
    port = closed_port.port
    p = make_provider(host="127.0.0.1", port=port)
    out = p.send([msg(i) for i in range(20)])
    assert len(out) == 20
    assert all(isinstance(o, Retry) for o in out)
    assert f"127.0.0.1:{port}" in out[0].reason


# -- connections ------------------------------------------------------------------------------


def test_connections_are_reused_across_send_calls(sandbox, make_provider):
    p = make_provider(sandbox, connections=1)
    for i in range(3):
        [out] = p.send([msg(i)])
        assert isinstance(out, Sent)
    assert sandbox.connections == 1
    assert len(sandbox.recorder) == 3
    assert len({r["connection"] for r in sandbox.recorder.all()}) == 1


def test_parallel_connections_are_pooled(sandbox, make_provider):
    p = make_provider(sandbox, connections=4)
    out1 = p.send([msg(i) for i in range(40)])
    out2 = p.send([msg(i) for i in range(40, 80)])
    assert all(isinstance(o, Sent) for o in out1 + out2)
    assert len(sandbox.recorder) == 80
    assert 1 < sandbox.connections <= 4
    assert sandbox.open_connections == sandbox.connections


def test_reconnects_when_the_server_dropped_an_idle_connection(sandbox, make_provider):
    p = make_provider(sandbox, connections=1)
    assert isinstance(p.send([msg(1)])[0], Sent)
    sandbox.disconnect_all()
    [out] = p.send([msg(2)])
    assert isinstance(out, Sent), out
    assert sandbox.connections == 2
    # an idle-timeout "421" to MAIL on a reused connection is also redone on a fresh one
    sandbox.faults.add({"stage": "mail", "smtp_code": 421, "smtp_message": "4.4.2 idle timeout"})
    [out] = p.send([msg(3)])
    assert isinstance(out, Sent), out
    assert sandbox.connections == 3
    assert [r["delivery_id"] for r in sandbox.recorder.all()] == ["dlv-1", "dlv-2", "dlv-3"]


def test_max_messages_per_connection(sandbox, make_provider):
    p = make_provider(sandbox, connections=1, max_messages_per_connection=2)
    out = p.send([msg(i) for i in range(5)])
    assert all(isinstance(o, Sent) for o in out)
    assert sandbox.connections == 3


# -- auth, TLS, check -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    d = tmp_path_factory.mktemp("tls")
    cert_path, key_path = d / "cert.pem", d / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def server_context(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*tls_files)
    return ctx


def test_starttls_with_auth(make_provider, tls_files):
    with SmtpSandbox(auth=("mailer", PASSWORD), tls_context=server_context(tls_files)) as sb:
        p = make_provider(sb, starttls=True, ca_file=str(tls_files[0]), username="mailer", password=PASSWORD)
        assert p.check() is None
        [out] = p.send([msg(1)])
        assert isinstance(out, Sent), out
        [rec] = sb.recorder.all()
        assert rec["tls"] is True and rec["authenticated"] is True


def test_implicit_tls(make_provider, tls_files):
    with SmtpSandbox(tls_context=server_context(tls_files), implicit_tls=True) as sb:
        p = make_provider(sb, ssl=True, ca_file=str(tls_files[0]))
        [out] = p.send([msg(1)])
        assert isinstance(out, Sent), out
        assert sb.recorder.all()[0]["tls"] is True


def test_untrusted_certificate_is_refused(make_provider, tls_files):
    with SmtpSandbox(tls_context=server_context(tls_files)) as sb:
        p = make_provider(sb, starttls=True)  # system CAs do not trust our test cert
        [out] = p.send([msg(1)])
        assert isinstance(out, Retry) and "TLS" in out.reason
        assert "TLS" in (p.check() or "")
        assert len(sb.recorder) == 0


def test_starttls_required_but_not_offered(sandbox, make_provider, tls_files):
    p = make_provider(sandbox, starttls=True, ca_file=str(tls_files[0]))
    [out] = p.send([msg(1)])
    assert isinstance(out, Retry) and "STARTTLS" in out.reason
    assert len(sandbox.recorder) == 0


def test_bad_credentials(make_provider):
    with SmtpSandbox(auth=("mailer", PASSWORD)) as sb:
        p = make_provider(sb, username="mailer", password="wrong-password-123")
        [out] = p.send([msg(1)])
        assert isinstance(out, Retry) and "535" in out.reason and "authentication" in out.reason
        problem = p.check()
        assert problem is not None and "535" in problem
        assert "wrong-password-123" not in out.reason + problem
        # no credentials at all: the server's 530 to MAIL
        p2 = make_provider(sb)
        [out2] = p2.send([msg(2)])
        assert isinstance(out2, Retry) and "530" in out2.reason
        assert len(sb.recorder) == 0


def test_check_up_down_and_refused_sender(sandbox, make_provider, closed_port):
    p = make_provider(sandbox)
    assert p.check() is None
    assert len(sandbox.recorder) == 0
    sandbox.faults.add({"stage": "mail", "smtp_code": 553, "smtp_message": "5.7.1 sender not owned by user"})
    problem = p.check()
    assert problem is not None and "553" in problem and "noreply@acme.test" in problem
    port = closed_port.port
    down = make_provider(host="127.0.0.1", port=port).check()
    assert down is not None and f"127.0.0.1:{port}" in down and "\n" not in down


def test_describe_masks_the_password(sandbox, make_provider):
    p = make_provider(sandbox, username="mailer", password=PASSWORD)
    d = p.describe()
    assert d["password"] == "(set)"
    assert d["host"] == sandbox.host and d["port"] == str(sandbox.port)
    assert PASSWORD not in json.dumps(d) + repr(p.config) + str(p.config)


def test_env_variables_configure_the_provider(sandbox, make_provider, monkeypatch):
    monkeypatch.setenv("NOTIFY_SMTP_HOST", sandbox.host)
    monkeypatch.setenv("NOTIFY_SMTP_PORT", str(sandbox.port))
    monkeypatch.setenv("NOTIFY_SMTP_FROM_ADDRESS", "alerts@acme.test")
    p = make_provider(host="192.0.2.1", port=1)  # env wins over the config file
    [out] = p.send([msg(1)])
    assert isinstance(out, Sent), out
    assert sandbox.recorder.all()[0]["mail_from"] == "alerts@acme.test"


@pytest.mark.parametrize(
    "options",
    [
        {"ssl": True, "starttls": True},
        {"username": "u"},
        {"from_address": "not an address"},
        {"connections": 0},
        {"port": 70000},
        {"timeout": -1},
    ],
)
def test_misconfigured(make_provider, options):
    with pytest.raises(Misconfigured) as exc:
        make_provider(**{"host": "127.0.0.1", "port": 2525, **options})
    assert PASSWORD not in str(exc.value)


# -- sandbox control API ----------------------------------------------------------------------


def test_control_api_over_http(sandbox, make_provider):
    p = make_provider(sandbox, connections=1)
    fault = json.dumps({"smtp_code": 550, "smtp_message": "5.1.1 user unknown", "match": "user1@"}).encode()
    auth = sandbox.control_headers

    def get(path: str) -> urllib.request.Request:
        return urllib.request.Request(sandbox.control_url + path, headers=auth)

    req = urllib.request.Request(sandbox.control_url + "/_sandbox/faults", data=fault, method="POST", headers=auth)
    with urllib.request.urlopen(req) as r:
        assert r.status == 204
    out = p.send([msg(1), msg(2)])
    assert isinstance(out[0], InvalidAddress) and isinstance(out[1], Sent)
    with urllib.request.urlopen(get("/_sandbox/messages")) as r:
        messages = json.loads(r.read())
    assert [m["delivery_id"] for m in messages] == ["dlv-2"]
    with urllib.request.urlopen(get("/_sandbox/stats")) as r:
        assert json.loads(r.read())["connections"] == 1
    bad = urllib.request.Request(
        sandbox.control_url + "/_sandbox/faults", data=b'{"stage": "nope"}', method="POST", headers=auth
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(bad)
    assert exc.value.code == 400
    exc.value.close()


def test_defaults_come_from_the_main_settings(tmp_path):
    settings = Settings(home=tmp_path, smtp_host="mail.acme.test", smtp_port=587, smtp_starttls=True)
    p = Provider(settings)
    d = p.describe()
    assert (d["host"], d["port"], d["tls"]) == ("mail.acme.test", "587", "starttls")
    assert d["from_address"] == settings.email_from
    implicit = Provider(Settings(home=tmp_path, provider_options={"smtp": {"ssl": True}}))
    assert implicit.describe()["port"] == "465"
