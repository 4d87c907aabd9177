"""Intake: validate a notify request, dedup it, record it in SQL, queue it.

Order matters for "nothing lost, nothing twice":

1. everything that can be rejected is checked first (request shape, template, recipient,
   channels, template data) — a rejected request leaves nothing behind;
2. the dedup key is claimed in Redis (``SET NX``, value ``?<notification id>`` while pending, the
   id once committed: a committed holder answers ``duplicate`` at once), then in SQL
   (``claim_dedup_key``: the ``dedup_keys`` table, whose primary key admits one holder per key),
   which decides when Redis lost the key or holds a claim still pending — two intakes racing on one
   key cannot both commit, on SQLite or PostgreSQL;
3. the notification row is committed (status ``queued``, with the id of the RQ job to come);
4. the RQ job is enqueued. If the process dies between 3 and 4, the reconciler finds the
   row with no job behind it and queues it: the answer ``queued`` is only given after 3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import bindparam, delete, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from notifyctl import keys, ordering, prefs
from notifyctl.context import Context
from notifyctl.db import write_lock
from notifyctl.errors import InputError, validation_message
from notifyctl.identifiers import check_user_id
from notifyctl.jsonload import load_json  # the one JSON loader; callers also import it from here
from notifyctl.models import DedupKey, Notification, NotificationStatus, OrderedNotification, User, new_id, utcnow
from notifyctl.policy import blocked_by
from notifyctl.secretdata import erase
from notifyctl.settings import CHANNELS
from notifyctl.templates import Template

JOB_FUNC = "worker.jobs.process"
PENDING = "?"  # a Redis dedup claim whose SQL commit is in flight: "?<notification id>"
DEDUP_KEY_MAX = 255  # characters; the API's Idempotency-Key header names the same limit
_INSERT_NOTIFICATION = Notification.__table__.insert()  # type: ignore[attr-defined]
_U = User.__table__  # type: ignore[attr-defined]
# the user's columns ``user_vars`` reads, and their opt-outs (``notifyctl.prefs``) in the same statement
_SELECT_USER = select(
    _U.c.id, _U.c.email, _U.c.locale, _U.c.timezone, _U.c.attributes, prefs.as_text(_U.c.id).label("opt_outs")
).where(_U.c.id == bindparam("id"))


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what the JSON columns' serializer (orjson) stores


def json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be stored in a JSON column, or None. JSON itself allows integers of
    any size; the database's JSON encoding keeps 64 bits."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, bool):
            continue
        if isinstance(v, int) and not _INT_MIN <= v <= _INT_MAX:
            return "holds an integer beyond 64 bits, which cannot be stored (send it as a string)"
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def storable(value: Any) -> Any:
    """Pydantic validator (``AfterValidator``) for fields stored in JSON columns."""
    problem = json_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _user_id(value: str) -> str:
    """Pydantic validator: ``identifiers.check_user_id`` (no control or invisible formatting characters)."""
    try:
        return check_user_id(value, "user id")
    except InputError as exc:
        raise ValueError(str(exc).removeprefix("user id: ")) from None


class NotifyRequest(BaseModel):
    """The seed's ``POST /v1/notify`` body; ``notifyctl send`` takes the same."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    recipient_id: Annotated[str, AfterValidator(_user_id)] = Field(min_length=1, max_length=255)
    template_id: str = Field(min_length=1, max_length=128)
    type: str | None = Field(None, max_length=128)
    priority: Literal["high", "normal", "low"] | None = None
    channels: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    data: Annotated[dict[str, Any], AfterValidator(storable)] = Field(default_factory=dict)
    dedup_key: str | None = Field(None, min_length=1, max_length=DEDUP_KEY_MAX)
    # sent after every earlier notification of this recipient, priority and key (notifyctl.ordering)
    ordering_key: str | None = Field(None, min_length=1, max_length=128)

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[str]) -> list[str]:
        v = list(dict.fromkeys(v))  # ["all", "all"] is ["all"], as the OpenAPI document allows
        for c in v:
            if c != "all" and c not in CHANNELS:
                raise ValueError(f"unknown channel {c!r} (use push, email, sms or all)")
        if "all" in v and len(v) > 1:
            raise ValueError("'all' cannot be combined with other channels")
        return v


def parse_request(payload: Any) -> NotifyRequest:
    if isinstance(payload, (str, bytes)):
        payload = load_json(payload, "request")
    if not isinstance(payload, dict):
        raise InputError("request: expected a JSON object")
    try:
        return NotifyRequest.model_validate(payload)
    except ValidationError as exc:
        raise InputError(validation_message(exc)) from None


@dataclass
class SubmitResult:
    notification_id: str
    status: str  # queued | suppressed
    reason: str | None = None
    priority: str | None = None
    channels: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def enqueue(
    ctx: Context,
    priority: str,
    notification_ids: list[str],
    job_id: str,
    as_of: float | None = None,
    shard: int = 0,
    pipeline: Any = None,
) -> None:
    """Queue one job of ``notification_ids``, whose recipients are all on ``shard`` (``notifyctl.shards``).

    RQ's own enqueue takes two round trips (the queue's name added to its set, then the job); here
    both go in one transaction, ``pipeline`` when given (the caller executes it), else our own."""
    q = ctx.queue(priority, shard)
    pipe = pipeline if pipeline is not None else q.connection.pipeline()
    q.enqueue(
        JOB_FUNC,
        args=(notification_ids,),
        kwargs={"as_of": as_of} if as_of is not None else {},
        job_id=job_id,
        job_timeout=ctx.settings.job_timeout,
        result_ttl=300,
        failure_ttl=7 * 86400,
        description=f"process {len(notification_ids)} notification(s)",
        pipeline=pipe,
    )
    if pipeline is None:
        pipe.execute()


def submit(ctx: Context, req: NotifyRequest) -> SubmitResult:
    # One Core connection for the request (an ORM Session around its statements cost more than they
    # did): its reads, then, for a request without dedup or ordering key (an OTP's case), its row, in
    # the reads' transaction. On PostgreSQL one checkout (one pre-ping) and no ROLLBACK and BEGIN
    # between the reads and the write; on SQLite the reads take no lock (no BEGIN before a SELECT).
    # The template first: its store may read SQL on a connection of its own, and a request never
    # holds two at once (with a pool's every connection held by a request waiting for a second, none
    # would go on).
    template = ctx.templates.get_shared(req.template_id)  # one every host's workers can load
    with ctx.engine.connect() as conn:
        return _submit(ctx, req, template, conn)


def _submit(ctx: Context, req: NotifyRequest, template: Template, conn: Connection) -> SubmitResult:
    category = template.category
    priority = req.priority or template.priority
    # a Core row, not an ORM object (identity map, instance state): read-only, the columns
    # ``user_vars`` reads, by the same attribute names
    row = conn.execute(_SELECT_USER, {"id": req.recipient_id}).first()
    user = cast("User | None", row)
    if user is None:
        raise InputError(f"recipient_id: unknown user {req.recipient_id!r}")
    opt_outs = prefs.parse(row.opt_outs or "")  # type: ignore[union-attr]
    shard = ctx.shard_of(user.id)  # the user's Redis: dedup key, ordering, queue
    r = ctx.shard_redis(shard)

    if req.channels == ["all"]:
        channels = template.channels
    else:
        missing = [c for c in req.channels if c not in template.parts]
        if missing:
            raise InputError(
                f"channels: template {template.id!r} has no {', '.join(missing)} part "
                f"(it has: {', '.join(template.channels)})"
            )
        channels = req.channels
    data = dict(req.data)
    for channel in channels:
        template.render(channel, {**data, "user": user_vars(user)})

    nid = new_id("n")
    now = utcnow()
    status = NotificationStatus.queued
    reason: str | None = None
    if all(blocked_by(opt_outs, c, category) for c in channels):
        status, reason = NotificationStatus.suppressed, "opted_out"
        data = erase(data, template.secret) or data  # never sent: its secret data is never kept

    ttl = ctx.settings.dedup_ttl
    dkey = keys.dedup(req.dedup_key) if req.dedup_key else None
    marker = PENDING + nid
    if dkey:
        # Layer 1, Redis: claim the key, marked pending until the SQL commit. A key that names a
        # committed notification answers "duplicate" here, without a SQL statement.
        if not r.set(dkey, marker, nx=True, ex=ttl):
            held = cast("bytes | None", r.get(dkey))  # the client does not decode responses
            if held is not None and not held.startswith(PENDING.encode()):
                return SubmitResult(held.decode(), "suppressed", "duplicate", priority, channels)
            # pending (another intake is committing it, or died doing so) or just expired: SQL decides
    job_id = f"job_{nid}"
    values = {
        "id": nid,
        "recipient_id": user.id,
        "type": req.type or template.id,
        "template_id": template.id,
        "category": category,
        "priority": priority,
        "channels": channels,
        "data": data,
        "dedup_key": req.dedup_key,
        "campaign_id": None,
        "wave": None,
        "status": status.value,
        "reason": reason,
        "job_id": job_id if status == NotificationStatus.queued else None,
        "due_at": now,
        "created_at": now,
        "updated_at": now,
    }
    ordered = bool(req.ordering_key) and status == NotificationStatus.queued
    try:
        with write_lock(ctx.engine, urgent=priority == "high"):
            if not req.dedup_key and not ordered:
                conn.execute(_INSERT_NOTIFICATION, values)  # the row alone
                conn.commit()
            else:
                conn.close()  # the reads' connection back to the pool first: never two at once
                with Session(ctx.engine) as session:
                    if req.dedup_key:
                        # Layer 2, SQL: one holder per key, enforced by the table's primary key. It
                        # decides whether Redis lost the key, or holds another intake's pending claim.
                        prior = claim_dedup_key(session, req.dedup_key, nid, now, ttl)
                        if prior is not None:
                            holder_id, until = prior
                            r.set(dkey, holder_id, ex=max(1, int((until - now).total_seconds())))  # type: ignore[arg-type]
                            return SubmitResult(holder_id, "suppressed", "duplicate", priority, channels)
                    if req.ordering_key and ordered:
                        group, seq = ordering.assign(r, session, user.id, priority, req.ordering_key)
                        session.add(OrderedNotification(notification_id=nid, group_key=group, seq=seq))
                    # a Core INSERT: the ORM's unit of work cost the intake more than the statement itself
                    session.connection().execute(_INSERT_NOTIFICATION, values)
                    session.commit()
    except BaseException:
        if dkey:
            _release(r, dkey, marker)
        raise
    # committed: the dedup key names the notification (repeats are answered by Redis alone from now
    # on) and its job is queued, in one round trip
    pipe = r.pipeline()
    if status == NotificationStatus.queued:
        enqueue(ctx, priority, [nid], job_id, shard=shard, pipeline=pipe)  # first: RQ opens the MULTI
    if dkey:
        pipe.set(dkey, nid, ex=ttl)
    pipe.execute()  # nothing to send when empty (a suppressed request without a dedup key)
    if status == NotificationStatus.queued:
        return SubmitResult(nid, "queued", None, priority, channels)
    return SubmitResult(nid, "suppressed", reason, priority, channels)


_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"


def _release(r: Any, dkey: str, marker: str) -> None:
    """Give up our pending claim of ``dkey`` (a failed commit), unless another intake holds it now."""
    r.eval(_RELEASE, 1, dkey, marker)


def user_vars(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "locale": user.locale, "timezone": user.timezone, **user.attributes}


# Dedup, layer 2: the SQL record of who holds a dedup key (``models.DedupKey``). Layer 1 is Redis
# (``submit``): a fast ``SET NX`` that answers most repeats without a SQL statement. It can lose a
# key (a restart without persistence, an eviction), and its answer while the first request is still
# committing is only "pending": this table decides. Its primary key lets one row per key exist, so
# two intakes racing on one key — two processes, two hosts, SQLite or PostgreSQL — cannot both
# commit a notification: the second one's insert fails (on PostgreSQL it waits for the first
# transaction, then fails or, if that one rolled back, succeeds) and it answers ``duplicate`` with
# the holder's id. The holds whose window has ended are purged by ``notifyctl.retention``; a
# database made before the table gets it filled by ``notifyctl.db``.

_K = DedupKey.__table__  # type: ignore[attr-defined]
CLAIM_TRIES = 5  # a holder that rolls back between our insert and our read: try again


def dedup_key_holder(session: Session | Connection, key: str, now: datetime) -> tuple[str, datetime] | None:
    """The notification id holding ``key`` at ``now`` and when its hold ends, or None."""
    row = session.execute(
        select(_K.c.notification_id, _K.c.expires_at).where(_K.c.key == key, _K.c.expires_at > now)
    ).first()
    return (row[0], row[1]) if row is not None else None


def claim_dedup_key(
    session: Session, key: str, notification_id: str, now: datetime, ttl: int
) -> tuple[str, datetime] | None:
    """Take ``key`` for ``notification_id`` in the session's transaction (nothing else may be pending
    in it: a lost race rolls it back). None when taken — the caller adds its notification and
    commits, which makes the hold final — else the current holder's id and the end of its hold."""
    for _ in range(CLAIM_TRIES):
        session.execute(delete(_K).where(_K.c.key == key, _K.c.expires_at <= now))  # an expired hold is over
        session.add(DedupKey(key=key, notification_id=notification_id, expires_at=now + timedelta(seconds=ttl)))
        try:
            session.flush()
            return None
        except IntegrityError:
            session.rollback()
        found = dedup_key_holder(session, key, now)
        session.rollback()  # end the read: the caller's transaction starts afresh
        if found is not None:
            return found
    raise RuntimeError(f"dedup key {key!r}: could not be claimed nor its holder read after {CLAIM_TRIES} tries")
