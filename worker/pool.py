"""One module: the worker pool's processes: the workers, the supervisor that restarts them and the
reconciler loop share one lifecycle; ~610 lines.

The worker pool: N non-forking RQ workers (``SimpleWorker``: no fork per job), a supervisor
that restarts the ones that die, and the reconciler loop.

Queue layout: workers take queues in priority order (high, normal, low). With two or more
workers, the first listens to ``high`` alone, so an OTP never waits behind a marketing batch
(and that worker gets RQ's crash-safe single-queue dequeue). Every worker refreshes a liveness
key every ``worker_heartbeat`` seconds; the reconciler treats a job whose worker went silent
for ``worker_alive_ttl`` seconds as abandoned and queues its notifications again.

With several Redis shards (``notifyctl.shards``), each worker serves one shard (``worker_plan``:
its RQ connection, jobs, users' keys and liveness key are that shard's), and the supervisor's
reconciler runs a round per shard served. A shard down when the pool starts (``pending``) gets its
workers and rounds once it answers and ``notifyctl.shards.check`` finds it the Redis the shared
database records (the supervisor asks every ``PICK_UP_EVERY`` seconds); one that comes back as
another Redis is never served, and said so once, as an error.
"""

from __future__ import annotations

# Lazy imports: rq (and notifyctl.rqjob, its Job) load when a queue or worker class is made, not when
# the pool module is imported (a CLI noun that reads the pool's names pays nothing for them).
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from notifyctl import keys
from notifyctl import shards as sharding
from notifyctl.alerts import check_alerts, check_dlq_alert
from notifyctl.analytics.fold import compact
from notifyctl.circuit import HALF_OPEN, Circuits, take_recoveries
from notifyctl.context import Context, freeze_heap, rq_serializer
from notifyctl.db import checkpoint, dispose_all
from notifyctl.dlq import DlqFilter, replay
from notifyctl.errors import ConfigError
from notifyctl.liveness import Liveness, unique_worker_name
from notifyctl.redisconn import (
    UNREACHABLE,
    Outage,
    QuietWhileUnreachable,
    RedisUnreachable,
    connect,
    redis_url,
    unreachable,
)
from notifyctl.settings import Settings
from notifyctl.vocabulary import PRIORITIES
from worker import jobs
from worker.providers import Misconfigured, load_provider
from worker.reconciler import reconcile as do_reconcile

log = logging.getLogger("notifyctl.worker")


def queue_sets(queues: list[str], pool: int) -> list[list[str]]:
    """Which queues each of ``pool`` workers listens to, in priority order."""
    ordered = [p for p in PRIORITIES if p in queues]
    if pool >= 2 and "high" in ordered and len(ordered) > 1:
        return [["high"]] + [ordered for _ in range(pool - 1)]
    return [ordered for _ in range(pool)]


def worker_plan(queues: list[str], pool: int, shards: list[int]) -> list[tuple[int, list[str]]]:
    """The shard and queues of each of ``pool`` workers: worker ``i`` serves shard
    ``shards[i % len(shards)]`` (one RQ connection, that shard's), and the workers of one shard
    share its queues as ``queue_sets`` says (with two or more, one serves ``high`` alone)."""
    if pool < len(shards):
        raise ValueError(f"--pool {pool} is fewer workers than the {len(shards)} shards served: each needs one")
    of_shard = {s: [i for i in range(pool) if shards[i % len(shards)] == s] for s in shards}
    plan: list[tuple[int, list[str]]] = [(0, [])] * pool
    for shard, workers in of_shard.items():
        for i, qs in zip(workers, queue_sets(queues, len(workers)), strict=True):
            plan[i] = (shard, qs)
    return plan


def _heartbeat(live: Liveness, every: float, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            live.beat()
        except Exception as exc:  # noqa: BLE001 - keep beating through a Redis blip
            if unreachable(exc):  # an outage: the pool's supervisor reports it, once
                log.debug("heartbeat: Redis unreachable: %s", exc)
            else:
                log.warning("heartbeat to Redis failed", exc_info=True)
        stop.wait(every)


RQ_HEARTBEAT_EVERY = 5.0  # seconds: RQ's own worker-key refresh, at most this often on its own
SUSPENSION_CHECK_EVERY = 1.0  # seconds: `rq suspend` is honoured within this


def _queue_class() -> type:
    from rq import Queue

    from notifyctl.rqjob import NotifyJob

    class NotifyQueue(Queue):
        """RQ's queue, less the read of a finished job's dependents: notifyctl enqueues no job with
        ``depends_on``, so the set is always empty, and RQ read it (SMEMBERS) after every job —
        one of an OTP's round trips. Its jobs are ``NotifyJob``s (``notifyctl.rqjob``); its serializer
        ``notifyctl.context.rq_serializer`` (RQ's pickle, checked faster) unless one is given."""

        job_class = NotifyJob

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("serializer", rq_serializer())
            super().__init__(*args, **kwargs)

        def move_dependents_to_ready(self, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
            return {}

    return NotifyQueue


def _worker_class(dequeue_timeout: int = 60) -> type:
    from rq import SimpleWorker
    from rq.executions import Execution
    from rq.job import JobStatus
    from rq.results import Result
    from rq.utils import now as rq_now
    from rq.utils import utcformat
    from rq.worker.base import WorkerStatus

    from notifyctl.rqjob import NotifyJob

    class NotifyWorker(SimpleWorker):
        """SimpleWorker (no fork per job) whose command channel wakes often, so that stopping
        takes milliseconds instead of RQ's one-second join; burst workers take no commands.

        An idle worker blocks ``dequeue_timeout`` s in its dequeue (RQ's default, 405 s, is its
        worker TTL less 15) and then renews it; its connection's reads may take 10 s more
        (``notifyctl.redisconn.connect(dequeue=True)``). When Redis is unreachable it tries again
        every second (RQ doubles the wait up to 60 s: a pool would sit a minute idle after Redis
        came back)."""

        burst_mode = False
        max_connection_wait_time = 1.0
        job_class = NotifyJob  # a job it saves whole (a failure, a retry) compresses nothing (notifyctl.rqjob)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # RQ's pickle, checked faster (``notifyctl.context.rq_serializer``): the worker hands it to
            # every queue, job, registry and result it builds
            kwargs.setdefault("serializer", rq_serializer())
            super().__init__(*args, **kwargs)

        @property
        def dequeue_timeout(self) -> int:
            return dequeue_timeout

        _beat_at = -math.inf  # (monotonic) this worker's last heartbeat

        def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
            # RQ refreshes its worker key (minutes of TTL: worker_ttl + 60 s) three round trips at a
            # time, three times around every job: an OTP's job paid 9 of its ~30 round trips for it.
            # The default refresh on its own is skipped within RQ_HEARTBEAT_EVERY s of the last one;
            # those with a TTL of their own, or inside one of RQ's pipelines, always go.
            at = time.monotonic()
            if timeout is None and pipeline is None and at - self._beat_at < RQ_HEARTBEAT_EVERY:
                return
            # RQ refreshes its worker key outside its reconnect loop too (after a dequeue, after a
            # job): a Redis gone at that moment would make the worker quit; the key can wait
            try:
                super().heartbeat(timeout, pipeline)
                self._beat_at = at
            except UNREACHABLE:
                if pipeline is not None:
                    raise
                log.debug("RQ heartbeat: Redis unreachable")

        _prepared: str | None = None  # the job whose start prepare_execution sent whole

        def prepare_execution(self, job: Any) -> Any:
            # RQ starts a job in two transactions, two round trips: the execution's record with the
            # worker's state "busy" (prepare_execution), then the worker's heartbeat, the job's
            # status "started" (with its last heartbeat, which RQ's job.heartbeat wrote once more just
            # before) and its removal from the intermediate queue (prepare_job_execution, the first
            # thing perform_job does, nothing in between). Here both go in one transaction, in
            # RQ's order; prepare_job_execution then has nothing left to send.
            with self.connection.pipeline() as pipe:
                ttl = self.get_heartbeat_ttl(job)
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.executions[execution.id] = execution
                self.set_state(WorkerStatus.BUSY, pipeline=pipe)
                self.heartbeat(ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                if len(self.queues) == 1:  # (as perform_job decides: RQ's crash-safe single-queue dequeue)
                    origin = next((q for q in self.queues if q.name == job.origin), None)
                    origin = origin or self.queue_class(job.origin, connection=self.connection)
                    pipe.lrem(origin.intermediate_queue_key, 1, job.id)
                pipe.execute()
            self._prepared = job.id
            return execution

        def prepare_job_execution(self, job: Any, remove_from_intermediate_queue: bool = False) -> None:
            if self._prepared is not None and self._prepared == job.id:
                self._prepared = None  # sent with its execution's record (prepare_execution above)
                return
            super().prepare_job_execution(job, remove_from_intermediate_queue)

        def handle_execution_ended(self, job: Any, queue: Any, heartbeat_ttl: int) -> None:
            # RQ refreshes the job's heartbeat here (one round trip) to cover the success or
            # failure callback that follows; notifyctl enqueues none
            if job.success_callback is None and job.failure_callback is None:
                job.ended_at = rq_now()
                return
            super().handle_execution_ended(job, queue, heartbeat_ttl)

        def handle_job_success(self, job: Any, queue: Any, started_job_registry: Any, execution: Any) -> None:
            # RQ WATCHes the job's dependents (a round trip of its own, with a connection checkout)
            # before its end's transaction, so that a dependent added meanwhile moves too; notifyctl
            # enqueues none (NotifyQueue above): the same transaction, sent alone. Anything RQ does
            # there that notifyctl never asks for (repeats, rate-limited or grouped jobs) goes to RQ.
            if job.repeats_left or job.has_rate_limit or job.group_id:
                super().handle_job_success(job, queue, started_job_registry, execution)
                return
            with self.connection.pipeline() as pipe:
                self.increment_successful_job_count(pipeline=pipe)
                self.increment_total_working_time(job.ended_at - job.started_at, pipe)
                ttl = job.get_result_ttl(self.default_result_ttl)
                if ttl != 0:
                    # RQ's job._handle_success, less its full save of the job (job.save: every field,
                    # the arguments compressed again, ~75 µs of CPU an OTP job): of those fields only
                    # the times have changed since the start's transaction wrote the job (perform_job
                    # sets started_at again; the end sets ended_at), the status is set here
                    job.set_status(JobStatus.FINISHED, pipeline=pipe)
                    pipe.hset(
                        job.key, mapping={"started_at": utcformat(job.started_at), "ended_at": utcformat(job.ended_at)}
                    )
                    Result.create(
                        job,
                        Result.Type.SUCCESSFUL,
                        return_value=job._result,
                        ttl=ttl,
                        worker_name=self.name,
                        pipeline=pipe,
                        execution_id=execution.id,
                        execution_started_at=execution.created_at,
                        execution_ended_at=job.ended_at,
                    )
                    job.finished_job_registry.add(job, ttl, pipe)
                job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                # the worker "idle" again in the same transaction (SimpleWorker set it right after,
                # a round trip of its own; our set_state then skips it: the state is the same)
                pipe.hset(self.key, "state", WorkerStatus.IDLE)
                pipe.execute()
            self._state = WorkerStatus.IDLE  # (once written: a failed transaction leaves it to RQ's own)
            log.debug("job %s finished in %s", job.id, job.ended_at - job.started_at)

        def handle_exception(self, job: Any, *exc_info: Any) -> None:
            # Redis gone while RQ records a job's end (its finished/failed registries): no traceback
            # for the log (the supervisor reports the outage once); the error leaves perform_job as
            # it did when the skipped job-heartbeat above raised it first, and the worker's
            # reconnect loop takes over (the job's notification is already recorded in SQL)
            if isinstance(exc_info[1], UNREACHABLE):
                log.debug("job %s: Redis unreachable while RQ recorded its end", job.id)
                raise exc_info[1]
            super().handle_exception(job, *exc_info)

        _suspension_checked = -math.inf  # (monotonic) this worker's last look at `rq suspend`

        def check_for_suspension(self, burst: bool) -> None:
            # RQ looks (with a worker-key heartbeat, one round trip) before every job; an OTP
            # behind a stream of jobs paid it each time: at most once a second is soon enough
            at = time.monotonic()
            if at - self._suspension_checked < SUSPENSION_CHECK_EVERY:
                return
            self._suspension_checked = at
            super().check_for_suspension(burst)

        def set_state(self, state: str, pipeline: Any = None) -> None:
            # RQ sets "idle" after each job and again before each dequeue: one round trip for nothing
            if pipeline is None and state == self._state:
                return
            super().set_state(state, pipeline)

        def subscribe(self) -> None:
            if self.burst_mode:
                self.pubsub_thread = None
                return
            self.pubsub = self.connection.pubsub()
            self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
            self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]  # RQ types it as None
                sleep_time=0.2, daemon=True, exception_handler=self._pubsub_exception_handler
            )

    return NotifyWorker


def run_worker(
    settings: Settings,
    priorities: list[str],
    burst: bool,
    name: str | None = None,
    reconcile: bool = False,
    shard: int = 0,
) -> int:
    """Run one worker in this process until stopped (or, with ``burst``, until the queues are empty),
    on the queues of ``shard`` (``notifyctl.shards``; 0 when there is one Redis)."""
    dispose_all(close=False)  # never use a parent's SQL connections after fork
    ctx = Context(settings, shard=shard)
    name = name or unique_worker_name(f"notify-{settings.host_name or socket.gethostname()}-{os.getpid()}")
    # RQ's own connection, for its blocking dequeue (long reads); the jobs use ctx.served (short ones)
    rq_conn = connect(settings, dequeue=True, shard=shard)
    queue_class = _queue_class()
    queues = [queue_class(keys.queue_name(p), connection=rq_conn) for p in priorities]
    w = _worker_class(settings.worker_dequeue_timeout)(queues, connection=rq_conn, name=name, queue_class=queue_class)
    w.burst_mode = burst
    live = Liveness(ctx.served, name, settings.worker_alive_ttl, [q.name for q in queues], host=settings.host_name)
    rt = jobs.configure(ctx, worker_name=name, liveness=live)
    rt.warm()  # before the first job (an OTP must not wait for imports), and into the frozen heap
    freeze_heap()
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(live, settings.worker_heartbeat, stop), daemon=True)
    beat.start()
    quiet = next((f for f in logging.getLogger("rq.worker").filters if isinstance(f, QuietWhileUnreachable)), None)
    try:
        if not burst:
            w.work(logging_level="WARNING")
            return EXIT_NO_REDIS if quiet is not None and quiet.quit_unreachable else 0
        # Burst: drain, let the reconciler queue whatever is due or lost, drain again.
        processed = 0
        while True:
            if reconcile:
                res = do_reconcile(ctx, force=True, shards=[shard])
                if res.retries_queued or res.recovered:
                    log.info("reconciler queued %d retries, recovered %d", res.retries_queued, res.recovered)
            did = w.work(burst=True, logging_level="WARNING")
            processed += int(did)
            if not did:
                return 0
    finally:
        stop.set()
        beat.join(timeout=5)  # (a beat after the delete would bring the key back)
        try:
            live.clear()  # only our own key: never another worker's
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            log.warning("liveness key not cleared: %s", exc, exc_info=not unreachable(exc))
        jobs.runtime().close()
        rq_conn.close()


def _child(
    settings: Settings, priorities: list[str], burst: bool, name: str, bulk: bool = False, shard: int = 0
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; SIGTERM = warm shutdown
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if bulk:
        _batch_scheduling()
    # RQ's "could not connect ... retrying" every second of an outage: the supervisor reports it
    logging.getLogger("rq.worker").addFilter(QuietWhileUnreachable())
    try:
        code = run_worker(settings, priorities, burst, name, shard=shard)
    except RedisUnreachable as exc:  # Redis unreachable at start: the supervisor starts it again later
        log.debug("worker not started: %s", exc)
        code = EXIT_NO_REDIS
    except Exception as exc:
        if not unreachable(exc):
            raise
        log.debug("worker stopped: Redis unreachable: %s", exc)
        code = EXIT_NO_REDIS
    raise SystemExit(code)


PICK_UP_EVERY = 2.0  # seconds between two looks at the shards down since the start
EXIT_NO_REDIS = 75  # (EX_TEMPFAIL) a worker that could not reach Redis: restarted without a word


def _batch_scheduling() -> None:
    """A bulk worker (beside a dedicated high-priority one) runs as ``SCHED_BATCH``: CPU-bound work
    that never preempts the others on waking, so the high worker, waking for an OTP, takes a core at
    once. Not a higher nice value: a reniced bulk worker holding the SQLite writer lock (its batch's
    write, ~40 ms of CPU) got a sliver of the CPU beside every nice-0 process on the machine, and the
    OTP's own writes waited on it for seconds (priority inversion); a batch process keeps its full
    share and releases the lock as soon as it would at nice 0."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: ordinary scheduling
        pass


def replay_after_outages(ctx: Context) -> int:
    """Replay what a provider outage dead-lettered, once that provider's circuit has closed again.

    Only transient failures ("retries exhausted") dead-lettered by that provider since the outage
    began (less the longest retry schedule) are replayed; permanent failures stay for an operator.
    """
    s = ctx.settings
    names = s.provider_names(voice=False)
    total = 0
    for name, opened_at in take_recoveries(ctx.redis, names).items():
        window = time.time() - opened_at + sum(s.retry_delays) + 60
        res = replay(ctx, DlqFilter.build(provider=name, error="retries exhausted", newer_than=f"{int(window)}s"))
        log.warning("provider %s recovered: replayed %d dead-lettered deliveries", name, len(res.replayed))
        total += len(res.replayed)
    return total


def probe_open_circuits(ctx: Context, providers: dict[str, Any]) -> list[str]:
    """Close the circuit of a provider that is healthy again even when no traffic would test it.

    Without this, an outage that dead-letters everything leaves no batch to try the provider with:
    the circuit would stay half-open and the automatic replay would never come. For each provider
    past its cooldown, ``check()`` (keys and reachability, nothing sent) decides. Returns the
    providers whose circuit it closed."""
    s = ctx.settings
    names = s.provider_names(voice=False)
    circuits = Circuits(ctx.redis, s.circuit_threshold, s.circuit_cooldown)
    closed = []
    for name, (state, _until) in circuits.states(names).items():
        if state != HALF_OPEN:
            continue
        try:
            provider = providers.get(name) or providers.setdefault(name, load_provider(name, s))
            problem = provider.check()
        except Misconfigured as exc:
            problem = str(exc)
        except Exception as exc:  # noqa: BLE001 - a failed probe only means "not yet"
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            circuits.record(name, ok=True, was=HALF_OPEN)
            closed.append(name)
            log.warning("provider %s answers again: circuit closed by probe", name)
        else:
            circuits.record(name, ok=False, was=HALF_OPEN)
    return closed


class Pool:
    def __init__(
        self,
        settings: Settings,
        queues: list[str],
        size: int,
        burst: bool = False,
        shards: list[int] | None = None,
        pending: Iterable[int] = (),
    ) -> None:
        self.settings = settings
        # the shards this pool serves (notifyctl.shards): all by default; one Redis is shard 0
        self.shards = list(range(len(settings.redis_shards) or 1)) if shards is None else shards
        # of those, the ones down at start: served once they answer and agree with the database
        self.pending = set(pending) & set(self.shards)
        self._refused: str | None = None  # the last disagreement logged
        plan = worker_plan(queues, size, self.shards)
        self.shard_of = [shard for shard, _ in plan]
        self.sets = [qs for _, qs in plan]
        self.burst = burst
        self.procs: list[Any] = [None] * size
        host = settings.host_name or socket.gethostname()
        # a random part per pool: two hosts with one hostname and the supervisor as PID 1 never clash
        self.names = [unique_worker_name(f"notify-{host}-{os.getpid()}") + f"-{i}" for i in range(size)]
        self._stopping = False
        self._mp = mp.get_context("fork")  # the child inherits the Settings object, secrets included
        self.restarts = 0
        self._started_at = [0.0] * size
        self._quick_deaths = [0] * size
        self._restart_at: list[float | None] = [None] * size

    def _start(self, i: int) -> None:
        # a bulk worker beside its shard's dedicated high worker
        dedicated = any(
            qs == ["high"] and sh == self.shard_of[i] for sh, qs in zip(self.shard_of, self.sets, strict=True)
        )
        bulk = dedicated and self.sets[i] != ["high"]
        p = self._mp.Process(
            target=_child,
            args=(self.settings, self.sets[i], self.burst, f"{self.names[i]}.{self.restarts}", bulk, self.shard_of[i]),
            name=self.names[i],
            daemon=False,
        )
        p.start()
        self.procs[i] = p
        self._started_at[i] = time.monotonic()

    def _pick_up(self, ctx: Context) -> None:
        """Start the workers of each pending shard that answers now and is the Redis the shared
        database records (``notifyctl.shards.check``); a shard that is another Redis stays unserved."""
        try:
            down = sharding.check(ctx)
        except RedisUnreachable:
            return  # every shard down: the reconciler rounds report the outage
        except ConfigError as exc:
            if str(exc) != self._refused:
                self._refused = str(exc)
                log.error("not serving Redis shard(s) %s: %s", ", ".join(map(str, sorted(self.pending))), exc)
            return
        except Exception as exc:  # noqa: BLE001 - look again in a moment
            if not unreachable(exc):
                log.warning("shard check failed", exc_info=True)
            return
        for shard in sorted(self.pending - set(down)):
            self.pending.discard(shard)
            log.warning("Redis shard %d answers and is the one the shared database records: serving it", shard)
            for i, sh in enumerate(self.shard_of):
                if sh == shard:
                    self._start(i)

    def run(self, reconcile_every: float = 1.0, on_tick: Any = None) -> int:
        ctx = Context(self.settings)
        # (with shards, which one is out is in each warning's reason)
        outage = Outage(log, "" if self.settings.redis_shards else redis_url(self.settings))
        dlq_config = self.settings.dlq
        probes: dict[str, Any] = {}
        next_dlq_check = time.monotonic() + dlq_config.check_s / 2
        freeze_heap()  # before the fork: the workers inherit it frozen
        for i in range(len(self.procs)):
            if self.shard_of[i] not in self.pending:
                self._start(i)
        next_pick_up = time.monotonic() + PICK_UP_EVERY

        def _stop(signum: int, _frame: Any) -> None:
            self._stopping = True

        def failed(what: str, exc: Exception) -> None:
            if unreachable(exc):
                outage.down(exc)  # one warning for the whole outage, one when it ends
            else:
                log.warning("%s failed", what, exc_info=True)

        old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            next_reconcile = 0.0
            rounds = -1
            while not self._stopping:
                alive = 0
                now = time.monotonic()
                for i, p in enumerate(self.procs):
                    if p is None:  # a worker of a shard down since the start
                        continue
                    if p.is_alive():
                        alive += 1
                    elif not self.burst:
                        alive += 1
                        restart_at = self._restart_at[i]
                        if restart_at is None:
                            # a worker that dies soon after starting (Redis down, say) is restarted
                            # with growing delays, not in a tight loop
                            quick = now - self._started_at[i] < 5
                            self._quick_deaths[i] = self._quick_deaths[i] + 1 if quick else 0
                            delay = min(10.0, 0.25 * 2 ** self._quick_deaths[i]) if quick else 0.0
                            if outage.active or p.exitcode == EXIT_NO_REDIS:
                                delay = min(delay, 1.0)  # back as soon as Redis is: the outage is reported once
                                log.debug("worker %s exited with %s; restarting in %.1fs", p.name, p.exitcode, delay)
                            else:
                                log.warning("worker %s exited with %s; restarting in %.1fs", p.name, p.exitcode, delay)
                            restart_at = self._restart_at[i] = now + delay
                        if now >= restart_at:
                            self._restart_at[i] = None
                            self.restarts += 1
                            self._start(i)
                if self.burst and alive == 0:
                    break
                if self.pending and now >= next_pick_up:
                    self._pick_up(ctx)
                    next_pick_up = time.monotonic() + PICK_UP_EVERY
                if time.monotonic() >= next_reconcile:
                    try:
                        # due work and lost high-priority jobs every second (campaign produce rate,
                        # retries, a killed worker's OTP); the search for all lost jobs every few seconds
                        rounds += 1
                        served = [shard for shard in self.shards if shard not in self.pending]
                        if served:
                            do_reconcile(ctx, check_lost=rounds % 3 == 0, paced=True, shards=served)
                        outage.up()
                    except Exception as exc:  # noqa: BLE001 - keep supervising through a blip
                        failed("reconciler round", exc)
                    try:
                        checkpoint(ctx.engine)  # SQLite: the WAL goes back into the database here, not in a writer
                    except Exception as exc:  # noqa: BLE001 - a checkpoint can wait for the next round
                        failed("SQLite checkpoint", exc)
                    try:
                        check_alerts(ctx, dlq_config)  # high-priority lag over its threshold, circuits opening
                    except Exception as exc:  # noqa: BLE001 - an alert must never stop the pool
                        failed("alert check", exc)
                    if rounds % 5 == 0:
                        try:
                            compact(
                                ctx.engine
                            )  # the analytics: deltas (PostgreSQL) and changed hours folded into the coarse tiers
                        except Exception as exc:  # noqa: BLE001 - reports read the deltas meanwhile
                            failed("analytics compaction", exc)
                    next_reconcile = time.monotonic() + reconcile_every
                if time.monotonic() >= next_dlq_check:
                    try:
                        probe_open_circuits(ctx, probes)
                        replay_after_outages(ctx)
                        check_dlq_alert(ctx, dlq_config)
                    except Exception as exc:  # noqa: BLE001 - an alert must never stop the pool
                        failed("DLQ check", exc)
                    next_dlq_check = time.monotonic() + dlq_config.check_s
                if on_tick:
                    on_tick(self)
                time.sleep(0.2)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            for p in self.procs:
                if p is not None and p.is_alive():
                    p.terminate()  # SIGTERM: RQ finishes the current job, then exits
            for p in self.procs:
                if p is not None:
                    p.join(timeout=self.settings.job_timeout)
            for provider in probes.values():
                provider.close()
            ctx.close()
        return 0
