"""The process-wide context: settings plus the connections built from them, created lazily."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING, Any

from notifyctl.db import engine_for
from notifyctl.keys import queue_name
from notifyctl.settings import Settings
from notifyctl.shards import shard_of
from notifyctl.template_store import TemplateStore

if TYPE_CHECKING:
    import redis
    from redis import Redis  # (inside the class, ``redis`` is the property)
    from rq import Queue
    from sqlalchemy.engine import Engine

# Lazy imports: connections are built on first use; the Redis client (notifyctl.redisconn) is imported
# then, so that `notifyctl --help`, which builds a Context, does not load it.


class Context:
    def __init__(self, settings: Settings, shard: int = 0) -> None:
        self.settings = settings  # the root, built once by whoever started the process (notifyctl.settings)
        self.shard = shard  # the shard a worker process serves (notifyctl.shards); 0 elsewhere

    @cached_property
    def redis(self) -> redis.Redis:
        """Shard 0: with one Redis, the only one; with shards, also what every host shares
        (circuits, pacing, provider tokens, metrics)."""
        from notifyctl.redisconn import connect

        return connect(self.settings)

    @cached_property
    def shard_count(self) -> int:
        return len(self.settings.redis_shards) or 1

    def shard_redis(self, shard: int) -> Redis:
        """The client of one shard (0 is ``redis``)."""
        if shard == 0:
            return self.redis
        from notifyctl.redisconn import connect

        cache: dict[int, Redis] = self.__dict__.setdefault("_shards", {})
        r = cache.get(shard)
        if r is None:
            r = cache[shard] = connect(self.settings, shard=shard)
        return r

    def shard_of(self, user_id: str) -> int:
        return shard_of(user_id, self.shard_count)

    def redis_for(self, user_id: str) -> Redis:
        """The shard holding ``user_id``'s keys (``redis`` when there is one Redis)."""
        return self.redis if self.shard_count == 1 else self.shard_redis(self.shard_of(user_id))

    @property
    def served(self) -> Redis:
        """The shard this process serves (a worker's: its jobs' users' keys, its liveness)."""
        return self.shard_redis(self.shard)

    @cached_property
    def engine(self) -> Engine:
        return engine_for(self.settings)

    @cached_property
    def templates(self) -> TemplateStore:
        return TemplateStore.from_settings(self.settings, lambda: self.engine)

    def queue(self, priority: str, shard: int = 0) -> Queue:
        """The RQ queue of ``priority`` on ``shard``."""
        from rq import Queue

        from notifyctl.rqjob import NotifyJob

        cache: dict[tuple[str, int], Queue] = self.__dict__.setdefault("_queues", {})
        q = cache.get((priority, shard))
        if q is None:
            # (its jobs' data compressed once, cheaply: notifyctl.rqjob; RQ's pickle checked faster)
            q = cache[priority, shard] = Queue(
                queue_name(priority),
                connection=self.shard_redis(shard),
                job_class=NotifyJob,
                serializer=rq_serializer(),
            )
        return q

    def close(self) -> None:
        self.__dict__.pop("_queues", None)
        for r in self.__dict__.pop("_shards", {}).values():
            r.close()
        r = self.__dict__.pop("redis", None)
        if r is not None:
            r.close()


_RQ_SERIALIZER: object = None


def rq_serializer() -> Any:
    """RQ's pickle serializer (the same bytes: jobs queued with either run with the other) as an
    instance of a class that names RQ's ``Serializer`` protocol as its base. RQ checks the
    serializer it is given (``rq.serializers.resolve_serializer``) every time it builds a job, a
    queue, a registry or a result — seven times in an OTP's job, once in its submit — with an
    ``isinstance`` against that runtime-checkable protocol: on Python 3.11 ~9 µs for RQ's own
    serializer class, which matches the protocol only structurally, ~4 µs for this instance."""
    global _RQ_SERIALIZER
    if _RQ_SERIALIZER is None:
        from rq.serializers import DefaultSerializer, Serializer

        dumps, loads = DefaultSerializer.dumps, DefaultSerializer.loads

        class PickleSerializer(Serializer):
            def dumps(self, obj: Any, /) -> bytes:
                return dumps(obj)

            def loads(self, data: bytes, /) -> Any:
                return loads(data)

        ours = PickleSerializer()
        # the import path RQ records for a worker it would start in a new process (SpawnWorker):
        # RQ's own serializer there, the same bytes
        vars(ours).update(__module__=DefaultSerializer.__module__, __qualname__=DefaultSerializer.__qualname__)
        _RQ_SERIALIZER = ours
    return _RQ_SERIALIZER


YOUNG_GC_THRESHOLD = 20_000  # allocations between two collections of the youngest generation (Python: 700)


def freeze_heap() -> None:
    """Take what a long-running process has built at start (imported modules, settings, templates,
    connections) out of the cyclic garbage collector's reach, and collect what it makes later less
    often.

    A worker keeps hundreds of thousands of such objects for its whole life, and every full
    collection walked all of them again: about a fifth of a worker's CPU in an email blast
    (``bench/RESULTS.md``). Objects made later are collected as usual; what is frozen was never
    going to be garbage. A batch then makes a few hundred thousand short-lived objects, nearly all
    freed by reference counting: at Python's default threshold (a collection every 700 net
    allocations) the collector still took ~5 µs per push of ``process`` (``bench/push_profile``),
    at ``YOUNG_GC_THRESHOLD`` under 1 µs, the process's peak memory unchanged. Call it once, when
    start-up is done."""
    import gc

    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)
