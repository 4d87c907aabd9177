"""Every Redis key notifyctl uses, in one place. All live under the ``notif:`` prefix, except
RQ's own (``rq:``), which stay compatible with ``rq info`` and rq-dashboard (the ones we read
directly are named at the end)."""

PREFIX = "notif:"


def dedup(key: str) -> str:
    """Intake dedup (layer 1): value = the notification id that holds the key."""
    return f"{PREFIX}dedup:{key}"


def sent(delivery_id: str) -> str:
    """Per-delivery send record (layer 3): ``lease:<lease id>:<index>`` while a worker holds it
    (``worker.claims``), ``sent:<provider id>`` after."""
    return f"{PREFIX}sent:{delivery_id}"


LEASE_PREFIX = f"{PREFIX}lease:"


def lease(lease_id: str) -> str:
    """One batch's lease (``worker.claims``): ``<worker>|<expires ms>|<flags>|<in-flight bitmap>``.
    Named by the send records of the batch's deliveries, so it lives on their Redis server."""
    return f"{LEASE_PREFIX}{lease_id}"


def rate(user_id: str, rule_key: str) -> str:
    """Sliding window (sorted set of send timestamps) for one user and one rate rule."""
    return f"{PREFIX}rate:{user_id}:{rule_key}"


RATE_PATTERN = f"{PREFIX}rate:*"  # every rate window (benchmarks clear them between runs)


def alive(worker_name: str) -> str:
    """Worker liveness, refreshed every few seconds by each worker process."""
    return f"{PREFIX}alive:{worker_name}"


def order(group: str) -> str:
    """The last number given in an ordering group (``notifyctl.ordering``)."""
    return f"{PREFIX}order:{group}"


RECONCILE_LOCK = f"{PREFIX}reconciler:lock"  # owned (a token), renewed while a round runs (``worker.reconciler``)
RECONCILE_PACE = f"{PREFIX}reconciler:pace"  # the pools' rounds: at most one started per 0.9 s in the cluster
STORE_ID = f"{PREFIX}store:id"  # this Redis's identity: a random token, set once (``notifyctl.stores``)
HOST_STORES = f"{PREFIX}hosts:stores"  # hash: host → the database it runs on (``notifyctl.stores``)


def queue_name(priority: str) -> str:
    """RQ queue per priority tier."""
    return f"notify-{priority}"


def circuit(provider: str) -> str:
    """Circuit breaker state of one provider (shared by all workers)."""
    return f"{PREFIX}circuit:{provider}"


def pace(provider: str) -> str:
    """The pace of one provider, shared by all workers (``notifyctl.pacing``): a hash with the rate
    learned from its throttle answers, the token bucket, and the count of accepted requests."""
    return f"{PREFIX}pace:{provider}"


def provider_token(provider: str, ident: str) -> str:
    """A provider credential shared by every worker and host (``worker.providers.shared_token``):
    the APNs JWT of one team, key id and key; the FCM access token of one service account.
    Value ``renew_at|expires_at|token``, expiring with the token."""
    return f"{PREFIX}ptoken:{provider}:{ident}"


def provider_token_lock(provider: str, ident: str) -> str:
    """Held by the one process minting ``provider_token(provider, ident)``."""
    return f"{PREFIX}ptoken-lock:{provider}:{ident}"


def webhook_seen(provider: str, event_id: str) -> str:
    """A provider event already applied (``notifyctl.inbound``), kept a while so a resent event is dropped."""
    return f"{PREFIX}webhook:{provider}:{event_id}"


def alert(what: str) -> str:
    """When the pool last alerted on ``what`` (``lag:high``, ``circuit:<provider>``, ``shard:<n>``),
    epoch seconds (``notifyctl.alerts``)."""
    return f"{PREFIX}alert:{what}"


DLQ_ALERT = f"{PREFIX}dlq:alert"
"""When the dead-letter alert last fired (``notifyctl.dlq``)."""

METRICS_DELIVERIES = f"{PREFIX}metrics:deliveries"
"""Hash ``status|channel|reason`` → count (``notifyctl.metrics``)."""

METRICS_IN_DOUBT = f"{PREFIX}metrics:in_doubt"
"""Hash channel → deliveries taken over in flight and sent again."""


def metrics_latency(provider: str) -> str:
    """Send latency histogram of one provider: hash bucket → count, plus ``sum`` and ``count``."""
    return f"{PREFIX}metrics:latency:{provider}"


METRICS_LATENCY_PATTERN = metrics_latency("*")


def metrics_sent_per_minute(hour: str) -> str:
    """Deliveries sent, per minute of one UTC hour (``YYYYmmddHH``): hash minute (``MM``) → count."""
    return f"{PREFIX}metrics:sent_min:{hour}"


def console_session(digest: str) -> str:
    """One operator console session (``notifyctl.console``), by the SHA-256 of its cookie."""
    return f"{PREFIX}console:session:{digest}"


def rq_job(job_id: str) -> str:
    """RQ's hash of one job (status, worker_name, origin, enqueued_at...)."""
    return f"rq:job:{job_id}"


def rq_worker(name: str) -> str:
    """RQ's hash of one worker (state, current_job, queues)."""
    return f"rq:worker:{name}"


def rq_worker_executions(name: str) -> str:
    """RQ 2's set of the executions one worker is running."""
    return f"rq:worker:{name}:executions"


def rq_queue(name: str) -> str:
    """RQ's list of the job ids waiting in one queue (``queue_name``)."""
    return f"rq:queue:{name}"
