"""Audit log: one JSON line per hop (received, routed, started, finished, sent, failed).

Only UIDs, AE titles, pipeline names, states and timings are written: never a patient's name,
ID or birth date. `write` refuses keys that would carry them.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

PHI_KEYS = {"patient_name", "patient_id", "patient_birth_date", "PatientName", "PatientID", "PatientBirthDate"}


class Audit:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._f = open(self.path, "a", buffering=1)

    def write(self, event: str, **fields: Any) -> None:
        bad = PHI_KEYS & set(fields)
        if bad:
            raise ValueError(f"audit fields may not carry patient data: {sorted(bad)}")
        line = json.dumps({"time": round(time.time(), 3), "event": event, **fields}, default=str)
        with self._lock:
            self._f.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._f.close()

    def read_since(self, since: int, limit: int | None = None) -> list[tuple[int, dict]]:
        """Events after line `since`, numbered by line (1 = the first), at most `limit` of them."""
        out: list[tuple[int, dict]] = []
        with open(self.path) as f:
            for seq, line in enumerate(f, 1):
                if seq > since and line.strip():
                    out.append((seq, json.loads(line)))
                    if limit is not None and len(out) >= limit:
                        break
        return out
