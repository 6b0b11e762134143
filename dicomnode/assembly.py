"""Series and study assembly: DICOM has no "series complete" or "study complete", so each is
complete when it has been quiet for a configured time. Instances that arrive later make it due
again, and a new job runs on the whole series or study: nothing received late is lost."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Literal

log = logging.getLogger("dicomnode.assembly")

Scope = Literal["series", "study"]


class Assembler:
    def __init__(self, quiet_seconds: dict[Scope, float], dispatch: Callable[[Scope, str], None], tick: float = 0.1):
        self.quiet, self.dispatch, self.tick = quiet_seconds, dispatch, tick
        self._last: dict[tuple[Scope, str], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="assembler", daemon=True)

    def touch(self, scope: Scope, uid: str) -> None:
        with self._lock:
            self._last[(scope, uid)] = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                due = sorted((k for k, t in self._last.items() if now - t >= self.quiet[k[0]]), reverse=True)
                for k in due:
                    del self._last[k]
            for scope, uid in due:  # series before studies, so a study job sees its series routed first
                try:
                    self.dispatch(scope, uid)
                except Exception:  # keep assembling the others; this one stays undispatched
                    log.exception("dispatch of %s %s failed; it will be tried again at the next restart", scope, uid)
