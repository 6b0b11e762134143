"""Durable instance storage: a file per instance, indexed in SQLite.

An instance counts as received only when its bytes are on disk (written, flushed, fsynced,
atomically renamed, directory fsynced) and its index row is committed. The C-STORE handler
answers Success only after `store` returns, so a crash after Success loses nothing.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dicomnode.db import Database

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


class Storage(Database):
    def __init__(self, root: Path, duplicates: str = "keep_first"):
        self.root = Path(root).resolve()
        self.duplicates = duplicates
        (self.root / "instances").mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        super().__init__(self.root / "index.sqlite", SCHEMA)

    def path_for(self, ident: Identity) -> Path:
        return self.root / "instances" / ident.study_uid / ident.series_uid / f"{ident.sop_instance_uid}.dcm"

    def store(self, data: bytes, ident: Identity, attributes: Callable[[], dict[str, Any]], calling_ae: str) -> str:
        """Write and index one instance; returns "stored", "replaced" or "duplicate" (kept first).

        `attributes` (what rules match on) is called only for the first instance of a series.
        """
        final = self.path_for(ident)
        with self._lock:
            exists = self._db.execute("SELECT 1 FROM instances WHERE sop_instance_uid=?", (ident.sop_instance_uid,)).fetchone()
            known_series = self._db.execute("SELECT 1 FROM series WHERE series_uid=?", (ident.series_uid,)).fetchone()
        if exists and self.duplicates == "keep_first":
            return "duplicate"
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp" / f"{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?)",
                                 (ident.sop_instance_uid, ident.sop_class_uid, ident.study_uid, ident.series_uid,
                                  str(final), len(data), now, calling_ae))
                # The instance count is derived from the index, so concurrent duplicates cannot skew it.
                self._db.execute(
                    "INSERT INTO series(series_uid, study_uid, attributes, calling_ae, first_at, last_at) VALUES (?,?,?,?,?,?) "
                    "ON CONFLICT(series_uid) DO UPDATE SET last_at=excluded.last_at",
                    (ident.series_uid, ident.study_uid, None if known_series else json.dumps(attributes()), calling_ae, now, now))
                self._db.execute("UPDATE series SET n_instances=(SELECT COUNT(*) FROM instances WHERE series_uid=?) "
                                 "WHERE series_uid=?", (ident.series_uid, ident.series_uid))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return "replaced" if exists else "stored"

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
