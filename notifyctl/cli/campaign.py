"""``notifyctl campaign``: launch timezone-staggered, throttled campaigns from CSV or SQL segments,
and list, inspect, pause, resume or cancel them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from notifyctl.cli.common import JsonOpt, console, err_console, fmt_time, get_ctx, print_json
from notifyctl.errors import InputError
from notifyctl.intake import json_problem
from notifyctl.jsonload import load_json

# Lazy imports: a CLI noun imports its work when it runs, so that `notifyctl --help` loads only what
# the root needs (no worker, campaigns, API or phone-number modules).

app = typer.Typer(help="Marketing campaigns: segments, timezone waves, throttled sending.", no_args_is_help=True)

_REF_HELP = "Campaign id or name (e.g. weekly_promo-2026-11-25), or a prefix of either that only one campaign has."


def _data(items: list[str], data_json: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if data_json is not None:
        extra = load_json(data_json, "--data-json")
        if not isinstance(extra, dict):
            raise InputError("--data-json: expected a JSON object")
        problem = json_problem(extra)
        if problem:
            raise InputError(f"--data-json: {problem}")
        out.update(extra)
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise InputError(f"--data: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    tasks: dict[str, Any] = {}

    def update(phase: str, done: int, total: int | None) -> None:
        if phase not in tasks:
            for tid in tasks.values():  # the previous phase is over: stop its clock
                task = bar.tasks[tid]
                bar.update(tid, total=task.completed)
                bar.stop_task(tid)
            label = "reading segment" if phase == "plan" else "writing recipients"
            tasks[phase] = bar.add_task(label, total=total)
        bar.update(tasks[phase], completed=done, total=total)

    with bar:
        yield update


@app.command("launch")
def launch(
    ctx: typer.Context,
    template: str | None = typer.Option(None, "--template", "-t", help="Template id, e.g. weekly_promo."),
    channels: list[str] = typer.Option([], "--channels", "-c", help="push, email, sms; comma-separate or repeat."),
    name: str | None = typer.Option(
        None,
        "--name",
        help="Unique campaign name, no spaces (default: TEMPLATE-YYYY-MM-DD, e.g. weekly_promo-2026-11-25).",
    ),
    segment_csv: str | None = typer.Option(None, "--segment-csv", help="CSV with a user_id column."),
    segment_sql: str | None = typer.Option(None, "--segment-sql", help='"SELECT user_id, ... FROM ..." (read-only).'),
    segment_db: str | None = typer.Option(None, "--segment-db", help="Database URL for --segment-sql."),
    rate: float | None = typer.Option(None, "--rate", help="Notifications/s produced (default from config)."),
    send_at: str | None = typer.Option(None, "--send-at", help="ISO 8601 time to send at (UTC if no offset)."),
    stagger_tz: bool = typer.Option(False, "--stagger-tz", help="Send at --local-time in each recipient's zone."),
    local_time: str | None = typer.Option(None, "--local-time", help="HH:MM wall-clock time for --stagger-tz."),
    if_passed: str = typer.Option("tomorrow", "--if-passed", help="When the local time passed today: tomorrow|now."),
    quiet_hours: str | None = typer.Option(None, "--quiet-hours", help="Local quiet hours HH:MM-HH:MM, or off."),
    data: list[str] = typer.Option([], "--data", "-d", help="Template data KEY=VALUE; repeatable."),
    data_json: str | None = typer.Option(None, "--data-json", help="Template data as a JSON object."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the audience, waves and SMS cost; write nothing."),
    resume: str | None = typer.Option(None, "--resume", help="Relaunch an interrupted launch (campaign id or name)."),
    as_json: bool = JsonOpt,
) -> None:
    """Launch a campaign: one scheduled notification per recipient, sent by the workers at the rate asked.

    \b
    Examples:
      notifyctl campaign launch -t weekly_promo --segment-csv users.csv --stagger-tz --local-time 10:00 --rate 500
      notifyctl campaign launch -t weekly_promo -c email --segment-sql "SELECT id AS user_id FROM users" --dry-run
      notifyctl campaign launch --resume c_01hx...   # after a crash: continues, nobody twice
    """
    from campaigns.launcher import LaunchSpec, resume_launch
    from campaigns.launcher import launch as do_launch

    c = get_ctx(ctx)
    with _progress(not as_json) as progress:
        if resume:
            given = [f for f, v in (("--template", template), ("--segment-csv", segment_csv),
                                    ("--segment-sql", segment_sql), ("--send-at", send_at)) if v]  # fmt: skip
            if given:
                raise InputError(f"--resume: relaunches with the campaign's own settings; drop {given[0]}")
            summary = resume_launch(c, resume, segment_db=segment_db, dry_run=dry_run, progress=progress)
        else:
            if not template:
                raise InputError("--template: missing (e.g. --template weekly_promo)")
            spec = LaunchSpec(
                template_id=template,
                channels=[x.strip() for item in channels for x in item.split(",") if x.strip()] or None,
                name=name,
                rate=rate,
                send_at=send_at,
                stagger_tz=stagger_tz,
                local_time=local_time,
                if_passed=if_passed,
                quiet_hours=quiet_hours,
                segment_csv=segment_csv,
                segment_sql=segment_sql,
                segment_db=segment_db,
                data=_data(data, data_json),
            )
            summary = do_launch(c, spec, dry_run=dry_run, progress=progress)
    if as_json:
        print_json(summary)
    elif summary.get("dry_run"):
        _print_dry(summary)
    else:
        _print_launch(summary)


def _print_bad(bad: dict[str, Any]) -> None:
    if not bad.get("count"):
        return
    kinds = ", ".join(f"{k} {n}" for k, n in bad["by_kind"].items())
    console.print(f"[yellow]{bad['count']} bad row(s)[/yellow] ({kinds}), skipped:")
    for b in bad["first"][:10]:
        console.print(f"  line {b['line']}: {b['message']}")
    if bad["count"] > 10:
        console.print(f"  … {bad['count'] - 10} more (--json lists up to {len(bad['first'])})")


def _waves_table(waves: list[dict[str, Any]], with_channels: bool) -> Table:
    t = Table(title="waves")
    t.add_column("local instant (UTC)")
    t.add_column("starts")
    t.add_column("ends")
    t.add_column("recipients", justify="right")
    if with_channels:
        t.add_column("deliveries", justify="right")
    t.add_column("time zones")
    for w in waves[:50]:
        row = [w["instant"][:19].replace("T", " "), w["start"][11:19], w["end"][11:19], str(w["recipients"])]
        if with_channels:
            row.append(", ".join(f"{k} {v}" for k, v in w.get("channels", {}).items()))
        row.append(", ".join(w["timezones"]))
        t.add_row(*row)
    return t


def _print_dry(s: dict[str, Any]) -> None:
    console.print(
        f"[bold]dry run[/bold] — {s['template_id']} ({s['category']}, priority {s['priority']}) "
        f"to {', '.join(s['channels'])} at {s['rate']:g}/s; nothing written"
    )
    console.print(
        f"segment rows {s['rows']}, recipients {s['recipients']}, duplicates {s['duplicates']}, "
        f"already in campaign {s['already_in_campaign']}, audience {s['audience']}"
    )
    _print_bad(s["bad_rows"])
    t = Table(title="per channel")
    for col in ("channel", "recipients", "deliveries", "suppressed", "failed"):
        t.add_column(col, justify="left" if col == "channel" else "right")
    for ch, c in s["per_channel"].items():
        sup = ", ".join(f"{k} {v}" for k, v in c["suppressed"].items()) or "0"
        fail = ", ".join(f"{k} {v}" for k, v in c["failed"].items()) or "0"
        t.add_row(ch, str(c["recipients"]), str(c["deliveries"]), sup, fail)
    console.print(t)
    console.print(_waves_table(s["waves"], True))
    cost = s["sms_cost"]
    if "sms" in s["channels"]:
        console.print(
            f"SMS: {cost['recipients']} message(s), {cost['segments']} segment(s) × {cost['per_segment']} "
            f"= {cost['estimate']:.2f} {cost['currency']}"
        )
    if s["timezone_fallbacks"]:
        console.print(f"{s['timezone_fallbacks']} recipient(s) with an unknown time zone use the default")


def _print_launch(s: dict[str, Any]) -> None:
    verb = "canceled during launch" if s.get("canceled") else "launched"
    console.print(f"campaign [bold]{s['name']}[/bold] ({s['campaign_id']}) {verb}; state {s['state']}")
    console.print(
        f"recipients {s['recipients']}: written {s['written']}, already written {s['skipped_existing']}, "
        f"duplicate rows {s['duplicates']}; "
        f"{s['template_id']} to {', '.join(s['channels'])} at {s['rate']:g}/s"
    )
    if s.get("first_due"):
        console.print(f"due from {s['first_due'][:19]} to {s['last_due'][:19]} UTC")
    _print_bad(s["bad_rows"])
    if len(s.get("waves", [])) > 1:
        console.print(_waves_table(s["waves"], False))


@app.command("list")
def list_cmd(ctx: typer.Context, limit: int = typer.Option(50, "--limit", min=1), as_json: bool = JsonOpt) -> None:
    """Campaigns, newest first."""
    from campaigns.report import list_campaigns

    rows = list_campaigns(get_ctx(ctx), limit)
    if as_json:
        print_json(rows)
        return
    t = Table()
    for col in ("id", "name", "template", "state", "recipients", "scheduled", "paused", "produced", "created"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["campaign_id"], r["name"], r["template_id"], r["state"], str(r["recipients"]), str(r["scheduled"]),
            str(r["paused"]), str(r["produced"]), fmt_time(r["created_at"]),
        )  # fmt: skip
    console.print(t)


@app.command("status")
def status_cmd(
    ctx: typer.Context, campaign: str = typer.Argument(..., help=_REF_HELP), as_json: bool = JsonOpt
) -> None:
    """Where every recipient stands: notifications by state, deliveries per channel, suppressions by reason."""
    from campaigns.report import campaign_status

    s = campaign_status(get_ctx(ctx), campaign)
    if as_json:
        print_json(s)
        return
    console.print(f"campaign [bold]{s['name']}[/bold] ({s['campaign_id']}): {s['state']}")
    console.print(
        f"{s['template_id']} to {', '.join(s['channels'])} at {s['rate']:g}/s; recipients {s['recipients']}"
        f" (planned {s['planned']}, bad rows {s['bad_rows']}); produced {s['produced']}"
    )
    console.print("notifications: " + ", ".join(f"{k} {v}" for k, v in sorted(s["notifications"].items())))
    if s["next_due"]:
        console.print(f"next due {fmt_time(s['next_due'])}, last {fmt_time(s['last_due'])} UTC")
    t = Table(title="per channel")
    for col in ("channel", "produced", "pending", "sent", "delivered", "opened", "failed", "suppressed"):
        t.add_column(col, justify="left" if col == "channel" else "right")
    for ch, c in s["per_channel"].items():
        sup = str(c["suppressed"])
        if c["suppressed_by_reason"]:
            sup += " (" + ", ".join(f"{k} {v}" for k, v in c["suppressed_by_reason"].items()) + ")"
        t.add_row(ch, *(str(c[k]) for k in ("produced", "pending", "sent", "delivered", "opened", "failed")), sup)
    console.print(t)
    if s["wave_progress"]:
        console.print(_progress_table(s["wave_progress"]))


def _progress_table(waves: list[dict[str, Any]]) -> Table:
    """Each wave's progress, as the console's Campaigns page shows it."""
    t = Table(title="per wave")
    for col in ("wave", "from (UTC)", "recipients", "scheduled", "paused", "pending", "sent", "failed", "suppressed"):
        t.add_column(col, justify="left" if col in ("wave", "from (UTC)") else "right")
    for w in waves[:50]:
        t.add_row(
            "-" if w["wave"] is None else f"{w['wave'] + 1} {', '.join(w['timezones'])}".strip(),
            (w["start"] or "")[:16].replace("T", " "), "-" if w["recipients"] is None else str(w["recipients"]),
            *(str(w[k]) for k in ("scheduled", "paused", "pending", "sent")),
            _by_reason(w["failed"], w["failed_by_reason"]), _by_reason(w["suppressed"], w["suppressed_by_reason"]),
        )  # fmt: skip
    if len(waves) > 50:
        t.caption = f"… {len(waves) - 50} more waves (--json lists them all)"
    return t


def _by_reason(n: int, by: dict[str, int]) -> str:
    return str(n) + (" (" + ", ".join(f"{k} {v}" for k, v in sorted(by.items())) + ")" if by else "")


@app.command("pause")
def pause_cmd(ctx: typer.Context, campaign: str = typer.Argument(..., help=_REF_HELP), as_json: bool = JsonOpt) -> None:  # noqa: E501
    """Hold every notification not yet produced."""
    from campaigns.state import pause

    r = pause(get_ctx(ctx), campaign)
    print_json(r) if as_json else console.print(
        f"{r['name']} ({r['campaign_id']}) paused: {r['paused']} held, {r['already_produced']} already produced; "
        f"state {r['state']}"
    )


@app.command("resume")
def resume_cmd(
    ctx: typer.Context, campaign: str = typer.Argument(..., help=_REF_HELP), as_json: bool = JsonOpt
) -> None:
    """Release a paused campaign; notifications whose time passed are spaced from now at the campaign's rate."""
    from campaigns.state import resume

    r = resume(get_ctx(ctx), campaign)
    print_json(r) if as_json else console.print(
        f"{r['name']} ({r['campaign_id']}) resumed: {r['resumed']} scheduled "
        f"({r['rescheduled']} moved to now onwards); state {r['state']}"
        + ("; the launch was interrupted: run `campaign launch --resume`" if r["launch_incomplete"] else "")
    )


@app.command("cancel")
def cancel_cmd(
    ctx: typer.Context, campaign: str = typer.Argument(..., help=_REF_HELP), as_json: bool = JsonOpt
) -> None:
    """Cancel every notification not yet produced (those already queued still go out)."""
    from campaigns.state import cancel

    r = cancel(get_ctx(ctx), campaign)
    print_json(r) if as_json else console.print(
        f"{r['name']} ({r['campaign_id']}) canceled: {r['canceled']} not sent, "
        f"{r['already_produced']} already produced; state {r['state']}"
    )
