"""A set of sandboxes started together: the fake providers a run needs, with throwaway credentials.

:class:`SandboxSet` starts the sandboxes serving the chosen providers (APNs over HTTP/2 + TLS, FCM
with its OAuth2 token endpoint, SendGrid, Twilio, SMTP, and SES + SNS through moto), generates their
credentials into a private directory (mode 0600), and says how notifyctl reaches them: provider
options, routes, the same as ``NOTIFY_*`` variables, and the control API's token shared by every
sandbox of the set. ``notifyctl sandbox`` (``notifyctl/cli/sandbox.py``) runs one until Ctrl-C; the
end-to-end tests use it as a library. ``parse_only`` / ``parse_fault`` read that command's
``--only`` and ``--fault``.

Ports: free ones by default; with ``base_port=N`` fixed ones, in this order: apns N, apns control
N+1, fcm N+2, sendgrid N+3, twilio N+4, smtp N+5, smtp control N+6, aws (ses/sns) N+7.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import string
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from notifyctl.errors import ConfigError, InputError
from notifyctl.home import PRIVATE_DIR, private_dir, write_private
from notifyctl.jsonload import load_json
from sandboxes.apns import ApnsSandbox
from sandboxes.aws import AwsSandbox
from sandboxes.base import control_headers, new_control_token
from sandboxes.fcm import FcmSandbox
from sandboxes.sendgrid import SendgridSandbox
from sandboxes.smtp import SmtpSandbox
from sandboxes.twilio import TwilioSandbox

#: provider name -> the sandbox that serves it
PROVIDER_SANDBOX = {
    "apns": "apns",
    "fcm": "fcm",
    "sendgrid": "sendgrid",
    "twilio": "twilio",
    "smtp": "smtp",
    "ses": "aws",
    "sns": "aws",
}
PROVIDERS = tuple(PROVIDER_SANDBOX)
SANDBOXES = ("apns", "fcm", "sendgrid", "twilio", "smtp", "aws")
PORT_OFFSETS = {
    "apns": 0,
    "apns_control": 1,
    "fcm": 2,
    "sendgrid": 3,
    "twilio": 4,
    "smtp": 5,
    "smtp_control": 6,
    "aws": 7,
}
APNS_TOPIC = "com.example.app"
TWILIO_FROM = "+15005550006"  # Twilio's "valid sender" test number
AWS_REGION = "us-east-1"
TOKEN_ENV = "NOTIFY_SANDBOX_TOKEN"  # the control API's token (Authorization: Bearer ...)


def parse_only(text: str | None) -> list[str]:
    """``apns,fcm,...`` -> provider names (``aws`` = ses + sns); all when empty."""
    if not text or not text.strip():
        return list(PROVIDERS)
    chosen: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        names = ["ses", "sns"] if name == "aws" else [name]
        for n in names:
            if n not in PROVIDER_SANDBOX:
                raise InputError(f"--only: unknown sandbox {raw.strip()!r} (known: {', '.join(PROVIDERS)}, aws)")
            if n not in chosen:
                chosen.append(n)
    if not chosen:
        raise InputError("--only: name at least one sandbox")
    return chosen


def parse_fault(text: str) -> tuple[str, list[dict[str, Any]]]:
    """``SANDBOX:JSON`` -> (sandbox name, faults). The JSON is one fault object or a list of them."""
    name, sep, raw = text.partition(":")
    name = name.strip().lower()
    if not sep:
        raise InputError(f"--fault {text!r}: expected SANDBOX:JSON such as apns:'{{\"status\": 410}}'")
    if name in ("ses", "sns"):
        name = "aws"
    if name not in SANDBOXES:
        raise InputError(f"--fault: unknown sandbox {name!r} (known: {', '.join(SANDBOXES)})")
    value = load_json(raw, f"--fault {name}")
    faults = value if isinstance(value, list) else [value]
    if not faults or not all(isinstance(f, dict) for f in faults):
        raise InputError(f"--fault {name}: expected a JSON object (or a list of objects)")
    for f in faults:
        count = f.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or (count < 1 and count != -1):
            raise InputError(f"--fault {name}: count must be a positive integer or -1")
    return name, faults


def _random_id(n: int) -> str:
    alphabet = string.ascii_uppercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(n))


class SandboxSet:
    """Start the sandboxes serving ``providers`` with fresh credentials under ``directory``.

    After :meth:`start`: ``sandboxes`` (sandbox name -> server), ``provider_options`` (provider ->
    options for ``Settings.provider_options``), ``routes`` (route -> ordered provider list) and
    :meth:`env` (the same as ``NOTIFY_*`` variables). ``control_token`` / ``control_headers``:
    what every sandbox's control API wants.
    """

    provider_sandbox = PROVIDER_SANDBOX  # provider name -> the sandbox that serves it

    def __init__(
        self,
        directory: Path,
        providers: list[str] | None = None,
        base_port: int = 0,
        email_from: str = "notifications@example.com",
        voice: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.providers = list(providers or PROVIDERS)
        self.base_port = base_port
        self.email_from = email_from
        self.voice = voice
        self.sandboxes: dict[str, Any] = {}
        self.provider_options: dict[str, dict[str, Any]] = {}
        self.routes: dict[str, list[str]] = {}
        self.control_token = new_control_token()

    @property
    def control_headers(self) -> dict[str, str]:
        return control_headers(self.control_token)

    def _port(self, what: str) -> int:
        return self.base_port + PORT_OFFSETS[what] if self.base_port else 0

    @property
    def needed(self) -> list[str]:
        return [s for s in SANDBOXES if any(PROVIDER_SANDBOX[p] == s for p in self.providers)]

    def start(self) -> SandboxSet:
        private_dir(self.directory)
        os.chmod(self.directory, PRIVATE_DIR)  # an existing one too: it holds keys
        try:
            for name in self.needed:
                getattr(self, "_start_" + name)()
                self.sandboxes[name].control_token = self.control_token
        except BaseException as exc:
            self.stop()
            if isinstance(exc, OSError):
                raise ConfigError(f"cannot start the {name} sandbox: {exc.strerror or exc}") from None
            raise
        self._routes()
        return self

    def stop(self) -> None:
        for sb in reversed(list(self.sandboxes.values())):
            try:
                sb.stop()
            except Exception:  # noqa: BLE001, S110 - best effort on the way out
                pass
        self.sandboxes.clear()

    def __enter__(self) -> SandboxSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one method per sandbox ------------------------------------------------------------------

    def _start_apns(self) -> None:

        key_id, team_id = _random_id(10), _random_id(10)
        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
            .decode()
        )
        key_file = write_private(self.directory / f"AuthKey_{key_id}.p8", pem.encode())
        sb = ApnsSandbox(
            {key_id: pem},
            topic=APNS_TOPIC,
            team_id=team_id,
            port=self._port("apns"),
            control_port=self._port("apns_control"),
        )
        sb.start()
        self.sandboxes["apns"] = sb
        ca_file = self.directory / "apns-ca.pem"
        write_private(ca_file, Path(sb.ca_file).read_bytes())
        self.provider_options["apns"] = {
            "base_url": sb.url,
            "key_file": str(key_file),
            "key_id": key_id,
            "team_id": team_id,
            "topic": APNS_TOPIC,
            "ca_file": str(ca_file),
        }

    def _start_fcm(self) -> None:

        sb = FcmSandbox(port=self._port("fcm"))
        sb.start()
        self.sandboxes["fcm"] = sb
        sa_file = sb.write_service_account(self.directory / "fcm-service-account.json")
        self.provider_options["fcm"] = {"service_account_file": str(sa_file), "base_url": sb.url}

    def _start_sendgrid(self) -> None:

        api_key = "SG." + secrets.token_urlsafe(16) + "." + secrets.token_urlsafe(24)
        sb = SendgridSandbox(port=self._port("sendgrid"), api_key=api_key)
        sb.start()
        self.sandboxes["sendgrid"] = sb
        self.provider_options["sendgrid"] = {"api_key": api_key, "base_url": sb.url}

    def _start_twilio(self) -> None:

        sid, token = "AC" + secrets.token_hex(16), secrets.token_hex(16)
        sb = TwilioSandbox(port=self._port("twilio"), account_sid=sid, auth_token=token)
        sb.start()
        self.sandboxes["twilio"] = sb
        self.provider_options["twilio"] = {
            "account_sid": sid,
            "auth_token": token,
            "from_number": TWILIO_FROM,
            "base_url": sb.url,
        }

    def _start_smtp(self) -> None:

        sb = SmtpSandbox(port=self._port("smtp"), control_port=self._port("smtp_control"))
        sb.start()
        self.sandboxes["smtp"] = sb
        self.provider_options["smtp"] = {"host": sb.host, "port": sb.port}

    def _start_aws(self) -> None:

        key_id, secret = "AKIA" + _random_id(16), secrets.token_urlsafe(30)
        sb = AwsSandbox(port=self._port("aws"), access_key_id=key_id, secret_access_key=secret, region=AWS_REGION)
        sb.start()
        self.sandboxes["aws"] = sb
        address = self.email_from.rsplit("<", 1)[-1].rstrip(">").strip()
        if "ses" in self.providers and "@" in address:
            sb.verify_identity(address.rsplit("@", 1)[1])  # the whole domain may send
        common = {"endpoint_url": sb.url, "access_key_id": key_id, "secret_access_key": secret, "region": AWS_REGION}
        for name in ("ses", "sns"):
            if name in self.providers:
                self.provider_options[name] = dict(common)

    def _routes(self) -> None:
        chosen = [p for p in PROVIDERS if p in self.providers]

        def pick(*names: str) -> list[str]:
            return [n for n in names if n in chosen]

        routes = {
            "push.ios": pick("apns"),
            "push.android": pick("fcm"),
            "email": pick("sendgrid", "ses", "smtp"),
            "sms": pick("twilio", "sns"),
        }
        if self.voice:
            routes["voice"] = pick("twilio")
        self.routes = {r: names for r, names in routes.items() if names}

    # -- views -----------------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The ``NOTIFY_*`` variables that point notifyctl at these sandboxes."""
        out: dict[str, str] = {}
        for route, names in self.routes.items():
            out["NOTIFY_PROVIDERS_" + route.replace(".", "_").upper()] = json.dumps(names)
        for name in PROVIDERS:
            for key, value in self.provider_options.get(name, {}).items():
                out[f"NOTIFY_{name.upper()}_{key.upper()}"] = str(value)
        out[TOKEN_ENV] = self.control_token
        return out

    def env_lines(self) -> list[str]:
        return [f"{k}={shlex.quote(v)}" for k, v in self.env().items()]

    def control_url(self, sandbox: str) -> str:
        sb = self.sandboxes[sandbox]
        return str(getattr(sb, "control_url", None) or sb.url)

    def endpoint(self, provider: str) -> str:
        sb = self.sandboxes[PROVIDER_SANDBOX[provider]]
        if provider == "smtp":
            return f"smtp://{sb.host}:{sb.port}"
        return str(sb.url)

    def counts(self) -> dict[str, int]:
        """Messages accepted so far, per provider."""
        out: dict[str, int] = {}
        for p in self.providers:
            sb = self.sandboxes.get(PROVIDER_SANDBOX[p])
            if sb is None:
                continue
            if p in ("ses", "sns"):
                out[p] = sum(1 for r in sb.recorder.all() if r.get("service") == p)
            else:
                out[p] = len(sb.recorder)
        return out

    def add_faults(self, sandbox: str, faults: list[dict[str, Any]]) -> None:
        sb = self.sandboxes.get(sandbox)
        if sb is None:
            raise InputError(f"--fault {sandbox}: that sandbox is not started (see --only)")
        try:
            sb.faults.add(faults)
        except (TypeError, ValueError) as exc:
            raise InputError(f"--fault {sandbox}: {exc}") from None
