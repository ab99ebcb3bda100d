"""A large message's DATA kept in an unlinked temporary file and read through a shared mapping, not the heap."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import tempfile
import threading
from typing import Any

from gateway.core.errors import SpillFailed

# Counting and copying out of the mapping go in pieces this big (no copy of the whole message on the heap).
_PIECE = 256 * 1024
# Messages at least this large have their pages released while they are parsed (read_through()).
RELEASE_WHILE_PARSING = 8 * 1024 * 1024
# A file system without O_TMPFILE (or an old kernel) answers with one of these: the file is made and unlinked.
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EINVAL, errno.EISDIR)


class SpillMap(mmap.mmap):
    """A message as it arrived, in a shared read-only mapping of an unlinked file, with the few bytes methods
    the MIME code uses besides those mmap has (indexing, slicing, the buffer protocol), and a faster find.

    Its pages are file pages: once the message is parsed, release_pages() takes them out of the process's
    memory without losing a byte (a later read brings them back from the page cache). Lifted attachments'
    base64 are compacted within the file (put()), as within the session's buffer otherwise, and handed out as
    memoryviews of the mapping (gateway/mime/largeparts.py)."""

    fd: int | None = None  # the file, for put() (the mapping holds a descriptor of its own)
    directory = ""  # where the file is (limits.spill_dir), for a failed put()'s error

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # put() runs on a parser thread, discard() on the event loop (a client gone mid-parse): the descriptor
        # must not be closed, and its number given to another file, while a write to it is under way.
        self._fd_lock = threading.Lock()

    def put(self, offset: int, data: bytes) -> None:
        """Write `data` into the file at `offset` (the mapping shows it at once). Not through the mapping: a
        file system such as ext4 does work for every page first written through a mapping.

        Raises SpillFailed when the write fails: in place, but a copy-on-write file system (btrfs, ZFS) or a
        thin-provisioned volume allocates new blocks for it, so a full disk (ENOSPC, EDQUOT) or EIO is possible."""
        with self._fd_lock, memoryview(data) as view:
            if self.fd is None:
                raise ValueError("spilled message already discarded")
            try:
                while view.nbytes:
                    written = os.pwrite(self.fd, view, offset)
                    offset += written
                    view = view[written:]
            except OSError as exc:
                error = exc.strerror or type(exc).__name__
                raise SpillFailed(
                    f"a large attachment could not be compacted in its file in limits.spill_dir: {error}",
                    directory=self.directory,
                    error=str(exc),
                ) from exc

    def find(self, sub: bytes, start: int | None = None, end: int | None = None) -> int:  # type: ignore[override]
        """As bytes.find, in copied pieces: mmap's own find compares at every position, many times slower than
        bytes' search."""
        size = len(self)
        at = 0 if start is None else max(0, start + size if start < 0 else start)
        stop = size if end is None else min(size, max(0, end + size if end < 0 else end))
        with memoryview(self) as view:
            while at + len(sub) <= stop:
                piece = bytes(view[at : min(stop, at + _PIECE + len(sub) - 1)])
                found = piece.find(sub)
                if found >= 0:
                    return at + found
                at += _PIECE
        return -1

    def count(self, sub: bytes) -> int:
        """How many times `sub` occurs (as bytes.count, in pieces)."""
        total = 0
        with memoryview(self) as view:
            for start in range(0, len(view), _PIECE):
                total += bytes(view[start : start + _PIECE + len(sub) - 1]).count(sub)
        return total

    def startswith(self, prefix: bytes, start: int = 0) -> bool:
        at = max(0, start + len(self) if start < 0 else start)
        return at <= len(self) and self[at : at + len(prefix)] == prefix

    def strip(self) -> bytes:
        """The message without leading and trailing whitespace (asked only of a message with no header)."""
        return self[:].strip()

    def release_pages(self, start: int = 0, end: int | None = None) -> None:
        """Take the mapping's pages (those wholly within start..end) out of this process's memory; their content
        stays in the file."""
        if self.closed:
            return
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = len(self) if end is None or end >= len(self) else end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.madvise(mmap.MADV_DONTNEED, first, last - first)

    def read_through(self, start: int, end: int) -> None:
        """The parser is done with start..end: a large message's pages there go now, so a scan's are not all in
        memory at once while it is parsed. A smaller one's go once it is parsed (release_pages()): fewer system
        calls, and each costs more than the memory it would save for a while."""
        if not self.closed and len(self) >= RELEASE_WHILE_PARSING:
            self.release_pages(start, end)

    def discard(self) -> None:
        """The message is no longer needed: unmap it now, which closes the file and frees its space. While a
        memoryview of it is still alive (an attachment held elsewhere a little longer) the mapping stays
        until the last one goes, its pages released meanwhile."""
        with self._fd_lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        if self.closed:
            return
        self.release_pages()
        # While views are still exported (BufferError) the mapping goes with the last of them (reference counting).
        with contextlib.suppress(BufferError):
            self.close()


class SpillFile:
    """An unlinked temporary file that DATA is appended to, then mapped as a SpillMap. It has no name from its
    start (O_TMPFILE) where the file system allows, else from right after it was made: nothing is ever left
    behind in the directory, whatever happens to the process."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or tempfile.gettempdir()
        self.size = 0
        self._fd: int | None = _open_unlinked(self.directory)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        with memoryview(data) as view:
            while view.nbytes:
                written = os.write(self._fd, view)
                self.size += written
                view = view[written:]

    def mapped(self) -> SpillMap:
        """The file's content as a SpillMap, which takes the file over."""
        assert self._fd is not None and self.size > 0
        try:
            mapped = SpillMap(self._fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except BaseException:
            self.close()
            raise
        mapped.fd, self._fd = self._fd, None
        mapped.directory = self.directory
        return mapped

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _open_unlinked(directory: str) -> int:
    flag = getattr(os, "O_TMPFILE", 0)
    if flag:
        try:
            return os.open(directory, flag | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in _NO_TMPFILE:
                raise  # the directory is missing or not writable: as for any file made there
    fd, path = tempfile.mkstemp(prefix="smtp-gateway-data-", dir=directory)
    os.unlink(path)
    return fd
