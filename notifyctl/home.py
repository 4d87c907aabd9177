"""The data directory (``$NOTIFY_HOME``) is private to the user who runs notifyctl.

What notifyctl keeps there holds personal data and secrets: the SQLite database and its WAL
(recipients, addresses, template data), the embedded Redis server's append-only file, snapshot
and log, the outbox (rendered messages), ``secret.key``, the sandbox's keys and env. So whatever
the umask, every directory notifyctl creates there is 0700 and every file 0600, at the point of
creation:

- ``private_dir`` for the home and its subdirectories;
- ``create_private`` / ``write_private`` / ``open_private`` for files notifyctl writes itself;
- ``PRIVATE_UMASK`` for processes that write files of their own (the embedded redis-server is
  started with it);
- SQLite's files: the database file is created 0600 before SQLite opens it, and SQLite gives its
  ``-wal``, ``-shm`` and journal files the database file's own mode.

A home created by an older notifyctl (or by hand) with looser modes is tightened on start
(``tighten``): notifyctl's own entries lose their group and other bits, and a warning says so.
Only notifyctl's own entries are touched (``OWN_ENTRIES``), so a home set to a directory that also
holds other things (even ``$HOME``) never has those changed.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("notifyctl")

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PRIVATE_UMASK = 0o077  # for child processes that create files of their own (redis-server)
_LOOSE = 0o077  # group and other bits

#: what notifyctl itself creates directly under the home (directories are walked whole)
OWN_ENTRIES = (
    "notify.db",
    "notify.db-wal",
    "notify.db-shm",
    "notify.db-journal",
    "notify.db.writelock",
    "notify.db.writegate",
    "secret.key",
    "config.toml",
    ".notifyctl-demo",
    "redis",
    "outbox",
    "sandbox",
    "templates",
)


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700 whatever the umask; an existing one is left as it is."""
    path = Path(path)
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode goes through the umask
    return path


def open_private(path: str | os.PathLike[str], flags: int) -> int:
    """``os.open`` creating the file 0600 when it does not exist (``flags`` gets ``O_CREAT``)."""
    fd = os.open(path, flags | os.O_CREAT, PRIVATE_FILE)
    try:
        os.fchmod(fd, os.fstat(fd).st_mode & ~_LOOSE & 0o7777)  # O_CREAT's mode goes through the umask too
    except OSError:  # not ours (a shared file we may only write): leave its mode
        pass
    return fd


def create_private(path: Path | str) -> None:
    """Make sure ``path`` exists, created 0600 (an existing file is not changed)."""
    os.close(open_private(path, os.O_WRONLY))


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` (replacing its content), the file 0600 even if it existed before."""
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(path)


def ensure_home(home: Path) -> Path:
    """Create the home 0700, or tighten an existing one (``tighten``); returns it."""
    home = Path(home)
    if not home.is_dir():
        return private_dir(home)
    fixed, failed = tighten(home)
    if fixed:
        log.warning(
            "%s: %d entr%s readable by other users, now private (directories 0700, files 0600)",
            home,
            len(fixed),
            "y was" if len(fixed) == 1 else "ies were",
        )
    if failed:
        log.warning("%s: cannot make %s private (not the owner?): %s", home, failed[0][0], failed[0][1])
    return home


def tighten(home: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Take the group and other bits off the home and notifyctl's own entries in it (``OWN_ENTRIES``,
    directories whole); symbolic links are neither followed nor changed. Returns (what was changed,
    what could not be: path and why)."""
    fixed: list[Path] = []
    failed: list[tuple[Path, str]] = []

    def fix(path: Path) -> bool:
        """Tighten one entry; True when it is a directory to walk."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if stat.S_ISLNK(st.st_mode):
            return False
        if st.st_mode & _LOOSE:
            try:
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~_LOOSE)
                fixed.append(path)
            except OSError as exc:
                failed.append((path, exc.strerror or str(exc)))
        return stat.S_ISDIR(st.st_mode)

    fix(home)
    for name in OWN_ENTRIES:
        top = home / name
        if not fix(top):
            continue
        for root, dirs, files in os.walk(top):
            for n in dirs + files:
                fix(Path(root) / n)
    return fixed, failed
