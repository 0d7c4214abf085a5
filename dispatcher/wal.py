"""The usage ledger's write-ahead log: records not yet confirmed by the stream, in a local file.

One file per process, found by trying ``path``, ``path.1``, ``path.2``… and taking the first whose
lock (``<file>.lock``, ``flock``) is free and whose header names the same stream: a restarted
process takes over the file its predecessor left (and replays it), while processes running side by
side never share one.

Format, one line each: a header ``#dispatcher-usage-wal 1 <stream> <publisher> <next id>``, then
``<publishing id> <record JSON>``. Publishing ids grow by one per record and are kept across
restarts (the header carries the next one), so a record replayed after a crash carries the id it was
first sent with and the stream's deduplication drops it if it was already stored.

Appends are unbuffered ``write`` calls: a record survives the process being killed (the kernel has
it). ``sync()`` (fsync) is for machine crashes and runs off the request path.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

MAGIC = b"#dispatcher-usage-wal"
VERSION = b"1"
MAX_FILES = 64  # processes per path on one host


def default_path(stream: str) -> Path:
    """``$XDG_STATE_HOME/dispatcher/usage-<stream>.wal`` (``~/.local/state`` when unset)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "dispatcher" / f"usage-{stream}.wal"


class WalBusy(RuntimeError):
    """Every candidate file is locked by another process (or belongs to another stream)."""


class WriteAheadLog:
    def __init__(self, path: str | Path, stream: str) -> None:
        self.base = Path(path)
        self.stream = stream
        self.path = self.base
        self.publisher = ""
        self.next_id = 1
        self.size = 0
        self._fd = -1
        self._lock_fd = -1

    def open(self) -> list[tuple[int, bytes]]:
        """Lock a file and return the records it holds (a predecessor's unconfirmed ones), oldest first."""
        self.base.parent.mkdir(parents=True, exist_ok=True)
        for path in self._candidates():
            entries = self._lock(path)
            if entries is not None:
                self._rewrite(entries)
                return entries
        raise WalBusy(f"no free write-ahead log file at {self.base} (.1 … .{MAX_FILES - 1} are all in use)")

    def _candidates(self) -> list[Path]:
        return [self.base, *(self.base.with_name(f"{self.base.name}.{n}") for n in range(1, MAX_FILES))]

    def _lock(self, path: Path) -> list[tuple[int, bytes]] | None:
        """Take ``path`` if no live process holds it and it is this stream's: its records (else None)."""
        lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None
        entries = self._read(path)
        if entries is None:  # another stream's file
            os.close(lock_fd)
            return None
        self.path, self._lock_fd = path, lock_fd
        return entries

    def orphans(self) -> list[tuple[WriteAheadLog, list[tuple[int, bytes]]]]:
        """The other files of this path left with records by processes that are gone (their locks are
        free), each locked now, with its records: to be sent under its own publisher name."""
        found = []
        for path in self._candidates():
            if path == self.path or not path.exists():
                continue
            other = WriteAheadLog(path, self.stream)
            entries = other._lock(path)
            if entries is None:
                continue
            if entries:
                found.append((other, entries))
            else:
                other.close(remove=True)
        return found

    def _read(self, path: Path) -> list[tuple[int, bytes]] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = b""
        lines = data.split(b"\n")
        header = lines[0].split(b" ")
        if len(header) == 5 and header[0] == MAGIC and header[1] == VERSION:
            if header[2].decode() != self.stream:
                return None
            self.publisher, self.next_id = header[3].decode(), int(header[4])
        else:
            # New file (or one cut short before its header was written: nothing in it was pending).
            self.publisher, self.next_id = f"dispatcher-usage-{uuid.uuid4().hex[:16]}", 1
            lines = [b""]
        entries: list[tuple[int, bytes]] = []
        # The last line has no newline if a write was cut short: only complete lines count.
        for line in lines[1:-1]:
            pid, _, record = line.partition(b" ")
            if pid.isdigit() and record:
                entries.append((int(pid), record))
                self.next_id = max(self.next_id, int(pid) + 1)
        return entries

    def append(self, record: bytes) -> int:
        """Write one record; returns its publishing id."""
        publishing_id = self.next_id
        self.next_id += 1
        line = b"%d %s\n" % (publishing_id, record)
        written = os.write(self._fd, line)
        self.size += written
        if written != len(line):  # disk full: end the torn line, so the next append starts a line of its own
            self.size += os.write(self._fd, b"\n")
            raise OSError(f"short write to {self.path} ({written} of {len(line)} bytes)")
        return publishing_id

    def compact(self, pending: Iterable[tuple[int, bytes]], *, durable: bool = False) -> None:
        """Replace the file by one holding only ``pending`` (the records not confirmed yet). Without
        ``durable`` there is no fsync here (it runs on the event loop): the periodic ``sync()`` covers it."""
        self._rewrite(list(pending), durable=durable)

    def _rewrite(self, entries: list[tuple[int, bytes]], *, durable: bool = True) -> None:
        header = b"%s %s %s %s %d\n" % (
            MAGIC, VERSION, self.stream.encode(), self.publisher.encode(), self.next_id,
        )  # fmt: skip
        body = b"".join(b"%d %s\n" % entry for entry in entries)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, header + body)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = len(header) + len(body)

    def sync(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)

    def close(self, *, remove: bool) -> None:
        """Release the file; ``remove`` (nothing pending) deletes it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if remove:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock; the lock file stays (removing it would race)
            self._lock_fd = -1
