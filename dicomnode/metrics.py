"""Counters and latency summaries for `/metrics` (Prometheus text format, version 0.0.4).

Only counts, states, pipeline names and seconds: no UID or patient data ever becomes a label.
"""

from __future__ import annotations

import threading
from collections import defaultdict


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels.items())) + "}" if labels else ""


class Metrics:
    """Thread-safe counters (`inc`) and count/sum summaries (`observe`), kept since the node started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple], float] = defaultdict(float)
        self._sums: dict[tuple[str, tuple], list[float]] = defaultdict(lambda: [0, 0.0])

    def inc(self, metric: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self._counters[(metric, tuple(sorted(labels.items())))] += amount

    def observe(self, metric: str, seconds: float, **labels: str) -> None:
        with self._lock:
            s = self._sums[(metric, tuple(sorted(labels.items())))]
            s[0] += 1
            s[1] += seconds

    def render(self, gauges: dict[str, tuple[str, list[tuple[dict[str, str], float]]]], help_: dict[str, str]) -> str:
        """The exposition text: this object's counters and summaries, plus `gauges` read now
        (name -> (help, [(labels, value)]))."""
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            sums = {k: list(v) for k, v in self._sums.items()}
        for name in sorted({k[0] for k in counters}):
            lines += [f"# HELP {name} {help_.get(name, name)}", f"# TYPE {name} counter"]
            lines += [f"{name}{_labels(dict(lab))} {v:g}" for (n, lab), v in sorted(counters.items()) if n == name]
        for name in sorted({k[0] for k in sums}):
            lines += [f"# HELP {name} {help_.get(name, name)}", f"# TYPE {name} summary"]
            for (n, lab), (count, total) in sorted(sums.items()):
                if n == name:
                    lines += [f"{name}_count{_labels(dict(lab))} {count:g}", f"{name}_sum{_labels(dict(lab))} {total:.6f}"]
        for name, (text, samples) in sorted(gauges.items()):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge"]
            lines += [f"{name}{_labels(labels)} {value:g}" for labels, value in samples]
        return "\n".join(lines) + "\n"
