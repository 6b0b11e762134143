"""Series assembly: DICOM has no "series complete", so a series is complete when it has been
quiet for a configured time. Instances that arrive later make the series due again, and a new job
runs on the whole series: nothing received late is lost."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

log = logging.getLogger("dicomnode.assembly")


class Assembler:
    def __init__(self, quiet_seconds: float, dispatch: Callable[[str], None], tick: float = 0.1):
        self.quiet, self.dispatch, self.tick = quiet_seconds, dispatch, tick
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="assembler", daemon=True)

    def touch(self, series_uid: str) -> None:
        with self._lock:
            self._last[series_uid] = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                due = [s for s, t in self._last.items() if now - t >= self.quiet]
                for s in due:
                    del self._last[s]
            for s in due:
                try:
                    self.dispatch(s)
                except Exception:  # keep assembling other series; the series stays undispatched
                    log.exception("dispatch of a series failed; it will be tried again at the next restart")
