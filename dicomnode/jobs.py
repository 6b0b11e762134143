"""Jobs in SQLite: queued -> running -> done, or failed (waiting to retry) -> ... -> dead.

Two kinds: `process` runs a pipeline on a stored series; `send` delivers result files to one
destination. Each attempt that fails is retried after an exponential back-off; after the last
attempt the job is `dead` with its reason, and `retry` puts it back in the queue. Jobs that were
running when the node stopped are queued again when it starts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dicomnode.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT, device TEXT, series_uid TEXT, study_uid TEXT,
  pipeline TEXT, destination TEXT, payload TEXT, state TEXT, attempts INTEGER DEFAULT 0,
  max_attempts INTEGER, next_run_at REAL, last_error TEXT, created_at REAL, started_at REAL,
  finished_at REAL, result TEXT);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, device, next_run_at);
"""
STATES = ("queued", "running", "done", "failed", "dead")


@dataclass
class Job:
    id: int
    kind: str
    device: str
    series_uid: str
    study_uid: str
    pipeline: str | None
    destination: str | None
    payload: dict[str, Any]
    state: str
    attempts: int
    max_attempts: int
    last_error: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None


class JobStore(Database):
    def __init__(self, path: Path, backoff_seconds: float = 2.0):
        super().__init__(path, SCHEMA)
        self.backoff = backoff_seconds

    def enqueue(self, kind: str, series_uid: str, study_uid: str, max_attempts: int, *, device: str = "cpu",
                pipeline: str | None = None, destination: str | None = None, payload: dict | None = None) -> int:
        now = time.time()
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO jobs(kind, device, series_uid, study_uid, pipeline, destination, payload, state, max_attempts,"
                " next_run_at, created_at) VALUES (?,?,?,?,?,?,?,'queued',?,?,?)",
                (kind, device, series_uid, study_uid, pipeline, destination, json.dumps(payload or {}), max_attempts, now, now))
            return int(cur.lastrowid)

    def resume(self) -> int:
        """Queue again what was running when the node stopped; returns how many."""
        with self._lock:
            return self._db.execute("UPDATE jobs SET state='queued', next_run_at=? WHERE state='running'", (time.time(),)).rowcount

    def claim(self, device: str) -> Job | None:
        """Take the oldest job of this device that is due, marking it running."""
        now = time.time()
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE state IN ('queued','failed') AND device=? AND next_run_at<=? ORDER BY id LIMIT 1",
                (device, now)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE jobs SET state='running', attempts=attempts+1, started_at=? WHERE id=?", (now, row[0]))
        return self.get(row[0])

    def done(self, job_id: int, result: dict | None = None) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET state='done', finished_at=?, result=?, last_error=NULL WHERE id=?",
                             (time.time(), json.dumps(result or {}), job_id))

    def fail(self, job_id: int, error: str) -> str:
        """Record a failed attempt; returns the new state (`failed` to retry later, or `dead`)."""
        job = self.get(job_id)
        assert job is not None
        dead = job.attempts >= job.max_attempts
        delay = self.backoff * 2 ** (job.attempts - 1)
        with self._lock:
            self._db.execute("UPDATE jobs SET state=?, last_error=?, next_run_at=?, finished_at=? WHERE id=?",
                             ("dead" if dead else "failed", error[:2000], time.time() + delay, time.time(), job_id))
        return "dead" if dead else "failed"

    def retry(self, job_id: int) -> Job:
        job = self.get(job_id)
        if job is None:
            raise KeyError(f"there is no job {job_id}")
        with self._lock:  # check and requeue in one statement: a worker may claim the job right after
            cur = self._db.execute("UPDATE jobs SET state='queued', attempts=0, next_run_at=?"
                                   " WHERE id=? AND state IN ('dead', 'failed')", (time.time(), job_id))
        if cur.rowcount == 0:
            state = (self.get(job_id) or job).state
            raise ValueError(f"job {job_id} is {state}; only dead or failed jobs can be retried")
        return replace(job, state="queued", attempts=0)

    def get(self, job_id: int) -> Job | None:
        rows = self.list(where="id=?", args=(job_id,))
        return rows[0] if rows else None

    def list(self, where: str = "1=1", args: tuple = (), limit: int = 1000, newest_first: bool = False) -> list[Job]:
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            cur = self._db.execute(
                "SELECT id, kind, device, series_uid, study_uid, pipeline, destination, payload, state, attempts, max_attempts,"
                " last_error, created_at, started_at, finished_at, result"
                f" FROM jobs WHERE {where} ORDER BY id {order} LIMIT {int(limit)}", args)
            rows = cur.fetchall()
        return [Job(*r[:7], json.loads(r[7] or "{}"), *r[8:15], json.loads(r[15]) if r[15] else None) for r in rows]

    def pending(self) -> set[str]:
        """Series and studies that a job not yet done or dead still needs (study jobs need the whole study)."""
        with self._lock:
            rows = self._db.execute("SELECT series_uid, study_uid, payload FROM jobs WHERE state IN ('queued','running','failed')"
                                    ).fetchall()
        return {r[0] for r in rows} | {r[1] for r in rows if json.loads(r[2] or "{}").get("scope") == "study"}

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {s: 0 for s in STATES} | {s: int(n) for s, n in rows}
