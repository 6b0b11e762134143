"""Jobs per minute: the node's in-process queue against Celery with one and two `dicomnode worker`s.

Each mode gets one warm-up series (models loaded, workers connected), then `--series` phantom
series in one association; each worker gets cores / workers PyTorch threads. The rate is jobs
finished per minute between the first job queued and the last one done (the node's job table).
Pipelines: `spine-seg` (the real model) and `derive` (a trivial test pipeline: what the queue
itself costs). Redis, the node and the workers run on this
machine. Run: `.venv/bin/python bench/bench_jobs.py [--series 8]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.node_helpers import NodeProcess, RedisServer, WorkerProcess, phantom_series, wait_for  # noqa: E402
from tests.test_node import storescu  # noqa: E402


def finished(node: NodeProcess) -> list[tuple[float, float]]:
    db = sqlite3.connect(node.storage / "jobs.sqlite")
    return db.execute("SELECT created_at, finished_at FROM jobs WHERE state='done' ORDER BY id").fetchall()


def measure(tmp: Path, series: list[Path], pipeline: str, workers: int, redis: RedisServer | None) -> float:
    jobs_cfg = {"backend": "celery", "broker": redis.url} if redis else {"cpu_workers": 2}
    node = NodeProcess(tmp, {"assembly": {"series_quiet_seconds": 0.5}, "jobs": jobs_cfg, "api": {"enabled": False},
                             "rules": [{"name": "all", "match": {"Modality": "MR"}, "pipelines": [pipeline]}]}).start()
    threads = str(max(1, (os.cpu_count() or 1) // max(workers, 1)))
    pool = [WorkerProcess(node, f"w{k}", "--threads", threads).start() for k in range(workers)]
    try:
        storescu(node.port, series[0])
        wait_for(lambda: len(finished(node)) == 1, 300, what="warm-up job")
        storescu(node.port, *series[1:])  # one association: all series complete at about the same time
        wait_for(lambda: len(finished(node)) == len(series), 1800, interval=0.5, what="all jobs")
        rows = finished(node)[1:]
        span = max(f for _, f in rows) - min(c for c, _ in rows)
        return 60 * len(rows) / span
    finally:
        for w in pool:
            w.stop()
        node.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--series", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    series = [phantom_series(tmp / f"s{k}", seed=900 + k) for k in range(args.series + 1)]
    redis = RedisServer(tmp / "redis").start()
    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores; {args.series} series of "
          f"{len(list(series[0].glob('*.dcm')))} slices after one warm-up series\n")
    print("| pipeline | in-process queue (2 threads) jobs/min | Celery, 1 worker | Celery, 2 workers |\n|---|---|---|---|")
    try:
        for pipeline in ("derive", "spine-seg"):
            t = time.time()
            rates = [measure(tmp / f"{pipeline}-inproc", series, pipeline, 0, None)]
            rates += [measure(tmp / f"{pipeline}-celery{n}", series, pipeline, n, redis) for n in (1, 2)]
            print(f"| {pipeline} | " + " | ".join(f"{r:.1f}" for r in rates) + f" |  <!-- {time.time() - t:.0f} s -->", flush=True)
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
