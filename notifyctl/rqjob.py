"""RQ's job, its data compressed once and cheaply (``NotifyJob``): the queues that enqueue notifyctl's
jobs (``Context.queue``) and the pool's workers (``worker.pool``) use it.

RQ stores a job's data (the pickled call: a bulk job's 1,000 notification ids, ~25 kB) zlib-compressed
at zlib's default level 6, and compresses it again each time the job is saved whole: when enqueued, and
by a worker whenever it saves a job it read (RQ's end of a job, a failure, a retry; the pool's end of a
finished job writes only its times, ``worker.pool``). Here the data is compressed at level 1 when the
job is made, and a job read back from Redis keeps the bytes it was stored as: a save writes them back
as they were, compressing nothing.
RQ reads any level (``zlib.decompress``), and data stored uncompressed as it is. Measured on 1,000-id
jobs: level 6 took 170-194 µs of CPU a job, level 1 93-101 µs, for 4 % more bytes (8,470 against
8,125); callgrind, 20 such jobs enqueued and run by the pool's worker class: zlib's compress 4,457
instructions a notification before (enqueue and the worker's save), 1,621 after.
"""

from __future__ import annotations

import zlib
from typing import Any

from rq.job import Job

LEVEL = 1  # zlib's fastest: see the module docstring


class NotifyJob(Job):
    """``Job`` whose stored form of the data is made once (level ``LEVEL``) or kept from Redis."""

    # the data's stored form, and the data it is the stored form of (compared by identity: the
    # bytes are immutable, and held here, so another object never takes their id)
    _packed: bytes | None = None
    _packed_of: bytes | None = None

    def restore(self, raw_data: Any) -> None:
        super().restore(raw_data)
        stored = raw_data.get(b"data") if isinstance(raw_data, dict) else None
        if isinstance(stored, bytes):
            self._packed, self._packed_of = stored, self._data  # type: ignore[assignment]

    def to_dict(self, include_meta: bool = True, include_result: bool = True) -> dict[str, Any]:
        data = self.data
        if self._packed_of is not data:
            self._packed, self._packed_of = zlib.compress(data, LEVEL), data
        # RQ's to_dict compresses ``self.data`` at level 6 itself: it is given nothing to compress,
        # and its result takes the stored form made above
        self._data = b""
        try:
            obj = super().to_dict(include_meta=include_meta, include_result=include_result)
        finally:
            self._data = data
        obj["data"] = self._packed
        return obj
