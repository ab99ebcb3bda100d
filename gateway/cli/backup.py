"""`smtp-gateway queue backup DEST`: a consistent copy of the SQLite queue, taken while the gateway runs.

`cp` of a WAL database can give a torn copy, and the one-liner install.md gave before (`sqlite3.connect(src)
.backup(...)`) created an empty queue at a mistyped source path and exited 0 (review firstcontact2 F1). Here
the source is opened read-only (SQLite's `mode=ro`: a missing file is an error, nothing is created) after the
checks every queue command makes, and DEST appears only whole: the copy is written beside it and renamed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import quote

from gateway.cli.common import Refused


def refuse_postgres(named: str) -> Refused:
    """A PostgreSQL queue is the server's to back up: its own tools are consistent and know its roles."""
    return Refused(
        [
            f"{named}: a PostgreSQL queue is backed up with the server's tools (pg_dump --format=custom DBNAME, or "
            "its base backups); queue backup copies a SQLite queue file (--spool FILE)"
        ]
    )


def backup(source: Path, dest: Path, force: bool) -> int:
    """Copy the queue at `source` (checked to be one by the caller) to `dest`; the size of the copy in bytes.

    Raises Refused when DEST cannot be written, or exists and `force` is not set."""
    if dest.is_dir():
        raise Refused([f"{dest.absolute()} is a directory: give the backup's file name (e.g. {dest / source.name})"])
    if _is_a_queue_file(source, dest):
        # Even with --force: the rename would put a new inode under the running gateway's queue (or its WAL),
        # which SQLite documents as a way to corrupt it (review today6b F1).
        raise Refused([f"{dest.absolute()} is the queue itself or one of its files: give the backup another name"])
    if dest.exists() and not force:
        raise Refused([f"{dest.absolute()} exists: give another name, or --force to replace it"])
    if not dest.parent.is_dir():
        raise Refused([f"no directory {dest.parent.absolute()} for the backup: create it first"])
    try:
        # In DEST's directory, so the rename is atomic; mode 0600 (mkstemp's): the queue holds the messages.
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise Refused([f"cannot write in {dest.parent.absolute()}: {exc.strerror or exc}"]) from None
    os.close(fd)
    tmp = Path(name)
    try:
        _copy(source, tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _sync_dir(dest.parent)
    return dest.stat().st_size


# The files SQLite keeps beside a database, and the queue's own side files (sqlite.py: rate limits, reserve).
_SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
_SIDE_FILES = ("", "-ratelimit", "-reserve")


def _is_a_queue_file(source: Path, dest: Path) -> bool:
    """Whether DEST names the queue or one of its files: by path once symlinks are resolved, or as the same
    inode (a hard link, or a path through a bind mount) when both exist."""
    target, base = dest.resolve(), source.resolve()
    for side in _SIDE_FILES:
        for suffix in _SQLITE_SUFFIXES:
            own = base.with_name(base.name + side + suffix)
            if target == own:
                return True
            with contextlib.suppress(OSError):  # either missing: only the path comparison applies
                if os.path.samefile(dest, own):
                    return True
    return False


def _copy(source: Path, tmp: Path) -> None:
    # mode=ro: never creates the file (the caller checked it), never checkpoints or removes the running
    # gateway's -wal. The backup API copies a snapshot that is consistent with the writers' commits.
    src = sqlite3.connect(f"file:{quote(str(source.absolute()))}?mode=ro", uri=True)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()
    with open(tmp, "rb+") as f:  # on disk before it takes DEST's name
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    """The rename itself on disk (a crash right after it could otherwise bring back the old DEST)."""
    with contextlib.suppress(OSError):  # a directory that cannot be opened for fsync: the rename is done
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
