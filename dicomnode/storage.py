"""Durable instance storage: a file per instance, indexed in SQLite.

An instance counts as received only when its bytes are on disk (written, flushed, fsynced,
atomically renamed, directory fsynced) and its index row is committed. The C-STORE handler
answers Success only after `store` returns, so a crash after Success loses nothing.

Files are written with O_DIRECT where the file system allows it: the bytes go from one reused,
page-aligned buffer to the disk, not through newly allocated page-cache pages (a node writes each
instance once and reads it back once, for its job). On the 2-core benchmark machine the copy into
fresh page-cache pages was 38 % of a receiver's CPU (docs/BENCHMARKS.md). Index rows of
instances that arrive together share one commit (one WAL fsync) instead of queueing for one each.
"""

from __future__ import annotations

import errno
import fcntl
import json
import mmap
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from dicomnode.db import Database

O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux; elsewhere every write goes through the page cache
DIRECT_BLOCK = 4096  # O_DIRECT needs offsets, lengths and the buffer aligned to the device's block
DIRECT_BUFFER = 4 << 20
_buffers: list[mmap.mmap] = []  # aligned buffers not in use; one per concurrent writer at most
UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  sop_instance_uid TEXT PRIMARY KEY, sop_class_uid TEXT, study_uid TEXT, series_uid TEXT,
  path TEXT, size INTEGER, received_at REAL, calling_ae TEXT);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
  series_uid TEXT PRIMARY KEY, study_uid TEXT, attributes TEXT, calling_ae TEXT,
  first_at REAL, last_at REAL, n_instances INTEGER DEFAULT 0, dispatched_instances INTEGER DEFAULT 0,
  study_dispatched_instances INTEGER DEFAULT 0);
"""


class InvalidInstance(ValueError):
    """The instance cannot be stored; the message says why, in words for an administrator."""


def check_uid(name: str, value: Any) -> str:
    v = str(value or "").strip().rstrip("\0")
    if not v:
        raise InvalidInstance(f"{name} is missing")
    if len(v) > 64 or not UID.match(v):
        raise InvalidInstance(f"{name} {v[:80]!r} is not a valid DICOM UID (digits and dots, at most 64)")
    return v


@dataclass(frozen=True)
class Identity:
    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str

    @classmethod
    def of(cls, ds: Any) -> "Identity":
        return cls(check_uid("SOP Class UID", getattr(ds, "SOPClassUID", None)),
                   check_uid("SOP Instance UID", getattr(ds, "SOPInstanceUID", None)),
                   check_uid("Study Instance UID", getattr(ds, "StudyInstanceUID", None)),
                   check_uid("Series Instance UID", getattr(ds, "SeriesInstanceUID", None)))


def write_durably(path: Path, chunks: Sequence[bytes], direct: bool = True) -> int:
    """Create `path` with `chunks` one after another, fsynced; returns the size. Direct I/O where
    asked and the file system takes it (some refuse it: EINVAL), the page cache otherwise."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(path, flags | (O_DIRECT if direct else 0), 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        fd = os.open(path, flags, 0o644)
    try:
        size = None
        if fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT:
            try:
                size = _write_direct(fd, chunks)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                # blocks larger than DIRECT_BLOCK on this device: start again through the page cache
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
        if size is None:
            size = sum(_write_all(fd, memoryview(c)) for c in chunks)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _write_direct(fd: int, chunks: Sequence[bytes]) -> int:
    """Whole blocks from an aligned buffer with O_DIRECT; the last partial block through the page
    cache (O_DIRECT cleared), since a direct write must be a whole number of blocks."""
    buf = _buffers.pop() if _buffers else mmap.mmap(-1, DIRECT_BUFFER)
    view, filled, size = memoryview(buf), 0, 0
    try:
        for chunk in chunks:
            rest = memoryview(chunk).cast("B")
            size += len(rest)
            while rest:
                n = min(len(rest), DIRECT_BUFFER - filled)
                view[filled:filled + n] = rest[:n]
                rest, filled = rest[n:], filled + n
                if filled == DIRECT_BUFFER:
                    filled -= _write_all(fd, view)
        whole = filled - filled % DIRECT_BLOCK
        _write_all(fd, view[:whole])
        if filled > whole:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~O_DIRECT)
            _write_all(fd, view[whole:filled])
    finally:
        _buffers.append(buf)
    return size


def _write_all(fd: int, data: memoryview) -> int:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
    return done


@dataclass
class _Row:
    """An instance's index row waiting for a commit; `series_attributes` (JSON) only for a series
    not yet indexed."""

    values: tuple
    series_attributes: str | None
    done: bool = False
    error: BaseException | None = None


class Storage(Database):
    def __init__(self, root: Path, duplicates: str = "keep_first"):
        self.root = Path(root).resolve()
        self.duplicates = duplicates
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        super().__init__(self.root / "index.sqlite", SCHEMA)
        self._queue_lock = threading.Lock()
        self._queue: list[_Row] = []

    def path_for(self, ident: Identity) -> Path:
        return self.root / "instances" / ident.study_uid / ident.series_uid / f"{ident.sop_instance_uid}.dcm"

    def store(self, data: bytes | bytearray | memoryview | Sequence[bytes], ident: Identity, attributes: Callable[[], dict[str, Any]],
              calling_ae: str) -> str:
        """Write and index one instance (its bytes, or pieces of them to be written one after
        another); returns "stored", "replaced" or "duplicate" (kept first).

        `attributes` (what rules match on) is called only for the first instance of a series.
        """
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        final = self.path_for(ident)
        with self._lock:
            exists = self._db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (ident.sop_instance_uid,)).fetchone()
            known_series = self._db.execute("SELECT 1 FROM series WHERE series_uid=?", (ident.series_uid,)).fetchone()
        if exists and self.duplicates == "keep_first":
            return "duplicate"
        series_attributes = None if known_series else json.dumps(attributes())
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        size = write_durably(tmp, chunks)
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        now = time.time()
        self._index(_Row((ident.sop_instance_uid, ident.sop_class_uid, ident.study_uid, ident.series_uid, str(final), size,
                          now, calling_ae), series_attributes))
        return "replaced" if exists else "stored"

    def _index(self, row: _Row) -> None:
        """Commit `row`, together with those other threads queued meanwhile: while one thread
        commits (the WAL's fsync), the rows of others wait for one transaction of their own."""
        with self._queue_lock:
            self._queue.append(row)
        with self._lock:
            if not row.done:
                with self._queue_lock:
                    batch, self._queue = self._queue, []
                try:
                    self._commit(batch)
                except BaseException as e:
                    for r in batch:
                        r.error = e
                for r in batch:
                    r.done = True
        if row.error is not None:
            raise row.error

    def _commit(self, rows: list[_Row]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for r in rows:
                _, _, study_uid, series_uid, _, _, now, calling_ae = r.values
                self._db.execute("INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?)", r.values)
                self._db.execute(
                    "INSERT INTO series(series_uid, study_uid, attributes, calling_ae, first_at, last_at) VALUES (?,?,?,?,?,?) "
                    "ON CONFLICT(series_uid) DO UPDATE SET last_at=excluded.last_at",
                    (series_uid, study_uid, r.series_attributes, calling_ae, now, now))
            # The instance count is derived from the index, so concurrent duplicates cannot skew it.
            for series_uid in {r.values[3] for r in rows}:
                self._db.execute("UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?) "
                                 "WHERE series_uid=?", (series_uid, series_uid))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------------ queries

    def series(self, series_uid: str) -> dict | None:
        rows = self._rows("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        if not rows:
            return None
        row = rows[0]
        row["attributes"] = json.loads(row["attributes"] or "{}")
        return row

    def series_files(self, series_uid: str) -> list[Path]:
        return [Path(r["path"]) for r in self._rows("SELECT path FROM instances WHERE series_uid=? ORDER BY path", (series_uid,))]

    def study_series(self, study_uid: str) -> list[dict]:
        rows = self._rows("SELECT * FROM series WHERE study_uid=? ORDER BY first_at", (study_uid,))
        for row in rows:
            row["attributes"] = json.loads(row["attributes"] or "{}")
        return rows

    def study_files(self, study_uid: str) -> list[Path]:
        return [Path(r["path"]) for r in self._rows("SELECT path FROM instances WHERE study_uid=? ORDER BY series_uid, path",
                                                    (study_uid,))]

    def undispatched(self) -> list[dict]:
        """Series with instances that no series or study routing has seen yet (also after a restart)."""
        return self._rows("SELECT series_uid, study_uid, n_instances > dispatched_instances AS series_due, "
                          "n_instances > study_dispatched_instances AS study_due FROM series "
                          "WHERE n_instances > dispatched_instances OR n_instances > study_dispatched_instances")

    def mark_dispatched(self, series_uid: str, n_instances: int) -> None:
        with self._lock:
            self._db.execute("UPDATE series SET dispatched_instances=? WHERE series_uid=?", (n_instances, series_uid))

    def mark_study_dispatched(self, counts: dict[str, int]) -> None:
        """Record the instance count of each series that a study routing has seen."""
        with self._lock:
            self._db.executemany("UPDATE series SET study_dispatched_instances=? WHERE series_uid=?",
                                 [(n, uid) for uid, n in counts.items()])

    def housekeep(self, days: float | None, max_bytes: int | None, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Delete the oldest instances beyond the retention limits; never those of series in `keep`
        or of studies in `keep` (studies that jobs still need). Returns how many instances were removed."""
        rows = self._rows("SELECT sop_instance_uid, series_uid, study_uid, path, size, received_at FROM instances ORDER BY received_at")
        total = sum(r["size"] for r in rows)
        cutoff = time.time() - days * 86400 if days else None
        doomed = []
        for r in rows:
            if r["series_uid"] in keep or r["study_uid"] in keep:
                continue
            if (cutoff is not None and r["received_at"] < cutoff) or (max_bytes is not None and total > max_bytes):
                doomed.append(r)
                total -= r["size"]
        for r in doomed:
            Path(r["path"]).unlink(missing_ok=True)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM instances WHERE sop_instance_uid=?", [(r["sop_instance_uid"],) for r in doomed])
            self._db.execute("UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances i WHERE i.series_uid=series.series_uid)")
            self._db.execute("UPDATE series SET dispatched_instances=MIN(dispatched_instances, n_instances), "
                             "study_dispatched_instances=MIN(study_dispatched_instances, n_instances)")
            self._db.execute("DELETE FROM series WHERE n_instances=0")
            self._db.execute("COMMIT")
        return len(doomed)

    def studies(self, limit: int = 1000, offset: int = 0) -> list[dict]:
        """Studies, most recently received first, with their series and instance counts."""
        return self._rows("SELECT study_uid, COUNT(DISTINCT series_uid) AS series, COUNT(*) AS instances, SUM(size) AS bytes, "
                          "MIN(received_at) AS first_at, MAX(received_at) AS last_at FROM instances GROUP BY study_uid "
                          "ORDER BY last_at DESC LIMIT ? OFFSET ?", (limit, offset))

    def series_instances(self, series_uid: str) -> list[dict]:
        return self._rows("SELECT sop_instance_uid, sop_class_uid, size, received_at FROM instances WHERE series_uid=? "
                          "ORDER BY path", (series_uid,))

    def instance(self, sop_instance_uid: str) -> dict | None:
        rows = self._rows("SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
        return rows[0] if rows else None

    def counts(self) -> dict[str, int]:
        r = self._rows("SELECT COUNT(*) AS instances, COUNT(DISTINCT series_uid) AS series, COUNT(DISTINCT study_uid) AS studies, "
                       "COALESCE(SUM(size), 0) AS bytes FROM instances")[0]
        return {k: int(v) for k, v in r.items()}
