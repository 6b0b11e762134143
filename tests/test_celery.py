"""Scale-out: `dicomnode serve` with `jobs: {backend: celery}` on a real redis-server, and two
`dicomnode worker` processes on loopback sharing the node's storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.node_helpers import NodeProcess, RedisServer, WorkerProcess, phantom_series, wait_for
from tests.test_node import indexed, jobs, storescu


@pytest.fixture
def redis(tmp_path: Path):
    r = RedisServer(tmp_path / "redis").start()
    yield r
    r.stop()


def celery_node(tmp_path: Path, redis: RedisServer, receiver: NodeProcess, pipeline: str, env: dict | None = None,
                **jobs_cfg) -> NodeProcess:
    cfg = {"assembly": {"series_quiet_seconds": 0.5},
           "jobs": {"backend": "celery", "broker": redis.url, "backoff_seconds": 0.5, **jobs_cfg},
           "destinations": {"archive": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": receiver.port}},
           "rules": [{"name": "all", "match": {"Modality": "MR"}, "pipelines": [pipeline], "send_to": ["archive"]}]}
    return NodeProcess(tmp_path / "node", cfg, env=env)


def test_two_workers_run_the_jobs_and_send_the_results(tmp_path: Path, redis: RedisServer) -> None:
    receiver = NodeProcess(tmp_path / "receiver", {}).start()
    markers = tmp_path / "markers"
    node = celery_node(tmp_path, redis, receiver, "slow-derive",
                       env={"DICOMNODE_TEST_MARKERS": str(markers), "DICOMNODE_TEST_SLEEP": "3"}).start()
    workers = [WorkerProcess(node, name).start() for name in ("w1", "w2")]
    series = [phantom_series(tmp_path / f"s{seed}", seed=seed) for seed in range(70, 74)]
    try:
        # sent back to back, so the 3-second jobs overlap: a worker holds one job at a time
        # (solo pool, prefetch 1), so the second job queued while the first runs must go to the other
        for folder in series:
            assert storescu(node.port, folder).returncode == 0
        wait_for(lambda: len(jobs(node)) == 8 and all(j["state"] == "done" for j in jobs(node)), 120, what="4 process + 4 send jobs done")
        assert len(indexed(receiver)) == 4  # one derived instance per series, sent by the workers
        pids = {p.name.split("-")[1] for p in markers.iterdir()}
        assert pids == {str(w.proc.pid) for w in workers}, "both workers ran jobs"
        process = [j for j in jobs(node) if j["kind"] == "process"]
        assert all(json.loads(j["result"]) == {"outputs": 1} for j in process)
    finally:
        for w in workers:
            w.stop()
        node.stop()
        receiver.stop()


def test_a_worker_killed_mid_job_does_not_lose_it(tmp_path: Path, redis: RedisServer) -> None:
    receiver = NodeProcess(tmp_path / "receiver", {}).start()
    markers = tmp_path / "markers"
    node = celery_node(tmp_path, redis, receiver, "slow-derive", visibility_timeout_seconds=3,
                       env={"DICOMNODE_TEST_MARKERS": str(markers), "DICOMNODE_TEST_SLEEP": "2"}).start()
    workers = {w.name: w for w in (WorkerProcess(node, "w1").start(), WorkerProcess(node, "w2").start())}
    try:
        assert storescu(node.port, phantom_series(tmp_path, seed=75)).returncode == 0
        first = wait_for(lambda: list(markers.glob("attempt-*")) if markers.exists() else [], 60, what="a worker starts the job")
        pid = first[0].name.split("-")[1]
        victim = next(w for w in workers.values() if str(w.proc.pid) == pid)
        victim.kill()
        wait_for(lambda: [j["state"] for j in jobs(node)] == ["done", "done"], 120, what="the job finished by the other worker")
        survivors = {p.name.split("-")[1] for p in markers.iterdir()} - {pid}
        assert survivors == {str(w.proc.pid) for w in workers.values() if w is not victim}
        assert len(indexed(receiver)) == 1
    finally:
        for w in workers.values():
            w.stop()
        node.stop()
        receiver.stop()


def test_no_worker_and_a_broker_that_is_down_fail_with_a_reason(tmp_path: Path, redis: RedisServer) -> None:
    receiver = NodeProcess(tmp_path / "receiver", {})
    node = celery_node(tmp_path, redis, receiver, "derive", task_timeout_seconds=2, max_attempts=1).start()
    try:
        assert storescu(node.port, phantom_series(tmp_path, seed=76)).returncode == 0
        dead = wait_for(lambda: [j for j in jobs(node) if j["state"] == "dead"], 60, what="job dead without a worker")
        assert "no Celery worker finished it within 2 s" in dead[0]["last_error"]
    finally:
        node.stop()
    redis.stop()
    node = celery_node(tmp_path / "down", redis, receiver, "derive", max_attempts=1).start()
    try:
        assert storescu(node.port, phantom_series(tmp_path / "down", seed=77)).returncode == 0
        dead = wait_for(lambda: [j for j in jobs(node) if j["state"] == "dead"], 120, what="job dead with the broker down")
        assert f"cannot queue the task on the Celery broker 127.0.0.1:{redis.port}" in dead[0]["last_error"]
    finally:
        node.stop()
