"""The process-wide context: settings plus the connections built from them, created lazily."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from notifyctl.db import engine_for
from notifyctl.keys import queue_name
from notifyctl.settings import Settings
from notifyctl.template_store import TemplateStore

if TYPE_CHECKING:
    import redis
    from rq import Queue
    from sqlalchemy.engine import Engine

# Lazy imports: connections are built on first use; the Redis client (notifyctl.redisconn) is imported
# then, so that `notifyctl --help`, which builds a Context, does not load it.


class Context:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings  # the root, built once by whoever started the process (notifyctl.settings)

    @cached_property
    def redis(self) -> redis.Redis:
        from notifyctl.redisconn import connect

        return connect(self.settings)

    @cached_property
    def engine(self) -> Engine:
        return engine_for(self.settings)

    @cached_property
    def templates(self) -> TemplateStore:
        return TemplateStore.from_settings(self.settings, lambda: self.engine)

    def queue(self, priority: str) -> Queue:
        from rq import Queue

        cache: dict[str, Queue] = self.__dict__.setdefault("_queues", {})
        q = cache.get(priority)
        if q is None:
            q = cache[priority] = Queue(queue_name(priority), connection=self.redis)
        return q

    def close(self) -> None:
        r = self.__dict__.pop("redis", None)
        if r is not None:
            r.close()


def freeze_heap() -> None:
    """Take what a long-running process has built at start (imported modules, settings, templates,
    connections) out of the cyclic garbage collector's reach.

    A worker keeps hundreds of thousands of such objects for its whole life, and every full
    collection walked all of them again: about a fifth of a worker's CPU in an email blast
    (``bench/RESULTS.md``). Objects made later are collected as usual; what is frozen was never
    going to be garbage. Call it once, when start-up is done."""
    import gc

    gc.collect()
    gc.freeze()
