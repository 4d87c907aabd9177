"""The OpenAPI document tells the truth (issue 14 I): schemathesis, from PyPI, against the real
server on a socket (uvicorn, as `notifyctl serve` runs it), reading the server's own
`/openapi.json`, with every check it has (`--checks all`): no 5xx, every status and media type
documented, schema-valid requests accepted, schema-invalid ones refused, `Allow` on 405, auth
enforced. Deterministic (`--generation-deterministic`) and bounded (`--max-examples`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from notifyctl.api.auth import create_key
from notifyctl.context import Context
from tests.util import ApiServer, seed
from worker.providers.ses.sns_signature import SnsCertificates

# The rules no schema can state, each with the operation that applies it: there, a schema-valid
# request may also be answered 422 (the document says why in the operation's 422 description).
SCHEMATHESIS_TOML = """
[[operations]]
include-name = "POST /v1/notify"
# the recipient must exist; the data must fill the template's parts for the chosen channels
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]

[[operations]]
include-name = "PUT /v1/users/{user_id}"
# a phone number must be one libphonenumber calls valid
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422", "429"]
"""


def _aws_unreachable(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("no network in tests", request=request)


@pytest.fixture
def served(ctx: Context) -> Iterator[tuple[ApiServer, str]]:
    seed(ctx)
    key = create_key(ctx, "schemathesis").key
    with ApiServer(ctx) as server:
        # never the real network, should a generated SNS message pass every offline check
        server.app.state.sns_certs = SnsCertificates(httpx.Client(transport=httpx.MockTransport(_aws_unreachable)))
        yield server, key


def test_the_document_lists_every_answer_with_its_error_body(served: tuple[ApiServer, str]) -> None:
    server, _key = served
    doc = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's error shape is not ours
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            errors = {code: r for code, r in op["responses"].items() if code[0] in "45"}
            assert "431" in errors and "503" in errors, (method, path)
            if path.startswith("/v1/"):
                assert "401" in errors, (method, path)
            for code, r in errors.items():
                schema = r["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, code)
    assert doc["components"]["schemas"]["Error"]["required"] == ["error"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert list(doc["paths"]["/o/{token}.gif"]["get"]["responses"]["200"]["content"]) == ["image/gif"]
    # the templates that exist, and no other, are what template_id takes
    pattern = doc["paths"]["/v1/notify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "otp_code" in pattern["properties"]["template_id"]["pattern"]


def test_allow_names_every_method_of_a_path(served: tuple[ApiServer, str]) -> None:
    server, key = served
    with httpx.Client(base_url=server.url, headers={"X-API-Key": key}, timeout=10) as c:
        for path, allowed in [("/v1/users/alice", "GET, PUT"), ("/u/x", "GET, POST"), ("/v1/notify", "POST")]:
            r = c.options(path)
            assert r.status_code == 405 and r.headers["allow"] == allowed, (path, r.headers)
            assert r.json() == {"error": "Method Not Allowed"}


def test_schemathesis_finds_nothing(served: tuple[ApiServer, str], tmp_path: Path) -> None:
    server, key = served
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_TOML, encoding="utf-8")
    st = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()"]
    cmd = [
        *st,
        "--config-file", str(config),
        "run", f"{server.url}/openapi.json",
        "--checks", "all",
        "--header", f"Authorization: Bearer {key}",
        "--generation-deterministic",
        "--max-examples", "10",
        "--workers", "1",
        "--request-timeout", "20",
        "--no-color",
    ]  # fmt: skip
    env: dict[str, Any] = {**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:].replace(key, "<key>")
    ran = re.search(r"(\d+) generated, (\d+) passed", out)
    assert ran is not None and int(ran[1]) == int(ran[2]) >= 500, out[-2000:]  # a real run, every case passed
