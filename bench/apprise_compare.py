"""notifyctl against apprise (issue 7, 6): the same emails sent by both into the SMTP sandbox."""

from __future__ import annotations

import time
import warnings
from typing import Any

from bench.common import Env, bulk_notifications, bulk_users, start_pool
from bench.harness import (
    PROMO,
    Log,
    count_sent,
    noop,
    settings_env,
    stop_pool,
    wait_workers,
)
from bench.sandboxes import SandboxProcess
from notifyctl.intake import user_vars
from notifyctl.models import User


def apprise_available() -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import apprise  # noqa: F401
    except ImportError:
        return False
    return True


def apprise_vs_notifyctl(n: int, pool: int = 3, batch: int = 500, log: Log = noop) -> dict[str, Any]:
    """(6) the same n emails to the same SMTP sink (aiosmtpd, separate process): Apprise (one
    notify per recipient, as its API goes) vs notifyctl's pool with providers_email=["smtp"]."""
    smtp = SandboxProcess("smtp")
    overrides = {
        "providers_email": ["smtp"],
        "batch_size": batch,
        "rate_limits": [],
        "provider_options": {"smtp": {"host": smtp.info["host"], "port": smtp.info["port"]}},
    }
    env = Env(**overrides)
    out: dict[str, Any] = {"emails": n, "pool": pool}
    proc = None
    try:
        ids = bulk_users(env.ctx, n)
        # notifyctl: the whole pipeline, first write to last tracked row
        proc = start_pool(env, pool, settings_env(overrides))
        wait_workers(env, pool)
        t0 = time.perf_counter()
        bulk_notifications(env.ctx, ids, "weekly_promo", ["email"], PROMO)
        while count_sent(env, "email") < n and time.perf_counter() - t0 < 600:
            time.sleep(0.1)
        el = time.perf_counter() - t0
        sent = count_sent(env, "email")
        out["notifyctl_sent"] = sent
        out["notifyctl_s"] = round(el, 2)
        out["notifyctl_per_s"] = round(sent / el, 1)
        stop_pool(proc)
        proc = None
        if not apprise_available():
            out["error"] = "apprise not installed: `pip install apprise` (the bench extra)"
            return out
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import apprise

        tpl = env.ctx.templates.get("weekly_promo")
        mails = []
        for uid in ids:
            user = User(id=uid, email=f"{uid}@example.com", timezone="UTC", locale="en", attributes={"first_name": uid})
            c = tpl.render("email", {**PROMO, "user": user_vars(user)})
            mails.append((user.email, c["subject"], c["text"]))
        log(f"  notifyctl: {out['notifyctl_per_s']}/s; apprise...")
        host, port = smtp.info["host"], smtp.info["port"]
        ok = 0
        with warnings.catch_warnings():
            # apprise 2.x imports the deprecated imghdr on Python 3.11 (a DeprecationWarning under -W error)
            warnings.simplefilter("ignore", DeprecationWarning)
            apprise.Apprise().add(f"mailto://{host}:{port}?from=notifications@example.com&to=warm@example.com")
            t1 = time.perf_counter()
            for to, subject, body in mails:
                a = apprise.Apprise()
                a.add(f"mailto://{host}:{port}?from=notifications@example.com&to={to}&secure=no")
                ok += bool(a.notify(title=subject, body=body))
            el2 = time.perf_counter() - t1
        out["apprise_sent"] = ok
        out["apprise_s"] = round(el2, 2)
        out["apprise_per_s"] = round(ok / el2, 1)
        out["apprise_version"] = apprise.__version__
        out["ratio_notifyctl_over_apprise"] = round(out["notifyctl_per_s"] / out["apprise_per_s"], 2) if ok else None
    finally:
        if proc is not None:
            stop_pool(proc)
        stats = smtp.stop()
        env.close()
    out["sink_accepted"] = stats.get("count")
    return out
