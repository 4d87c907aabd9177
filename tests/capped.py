"""Render templates in a child process whose address space is capped (``RLIMIT_AS``): the tests of
the rendering limits feed it hostile templates, and a regression must fail a test with a
MemoryError in the child, not swap the machine the suite shares with others."""

from __future__ import annotations

import json
import resource
import select
import subprocess
import sys
from typing import Any

from tests.conftest import ROOT

ADDRESS_SPACE = 2 << 30

_CHILD = """
import json, sys, time
from notifyctl.errors import TemplateError

def peak_mb():
    # VmHWM: this process's own peak RSS. Not getrusage's ru_maxrss, which on Linux keeps the
    # high-water mark of the memory the process had before exec: the forked pytest process's,
    # hundreds of MB late in a full run, whatever the child itself rendered.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) // 1024
    raise RuntimeError("no VmHWM in /proc/self/status")

from notifyctl.templates import Template
for line in sys.stdin:
    req = json.loads(line)
    if req.get("html"):  # the email's HTML part: autoescaped, strings are Markup
        parts, channel, part = {"email": {"subject": "s", "html": req["src"], "text": "t"}}, "email", "html"
    else:
        parts, channel, part = {"sms": {"text": req["src"]}}, "sms", "text"
    t = Template(id="bomb", category="transactional", priority="normal", parts=parts)
    t0 = time.perf_counter()
    try:
        out, err = t.render(channel, req.get("data", {}))[part], None
    except TemplateError as exc:
        out, err = None, str(exc)
    print(json.dumps({
        "error": err, "length": None if out is None else len(out), "seconds": time.perf_counter() - t0,
        "max_rss_mb": peak_mb(),
    }), flush=True)
"""


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


class CappedRenderer:
    """``render(src, data)`` in the capped child: ``{"error", "length", "seconds", "max_rss_mb"}``."""

    def __init__(self, timeout: float = 120) -> None:
        self.timeout = timeout
        self.proc = self._start()

    @staticmethod
    def _start() -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, cwd=ROOT, preexec_fn=_cap,
        )  # fmt: skip

    def restart(self) -> None:
        """A fresh child (its peak memory is that of what it renders from now on)."""
        self.close()
        self.proc = self._start()

    def render(self, src: str, data: dict[str, Any] | None = None, html: bool = False) -> dict[str, Any]:
        """``src`` as an SMS text, or with ``html`` as an email's HTML part (template ``bomb``)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"src": src, "data": data or {}, "html": html}) + "\n")
        self.proc.stdin.flush()
        poll = select.poll()  # (not select(): a long session's descriptors may be numbered past 1023)
        poll.register(self.proc.stdout, select.POLLIN)
        ready = poll.poll(self.timeout * 1000)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            self.proc = self._start()
            raise AssertionError(f"the child rendering {src[:120]!r} died or hung: {err[-2000:]}")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> CappedRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
