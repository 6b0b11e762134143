"""Jobs on Celery with a Redis broker, for sites that outgrow one machine.

The node stays the owner of the jobs (SQLite, states, retries, back-off): with
`jobs: {backend: celery}` its dispatcher turns each due job into a Celery task and reads the
outcome back from the result backend. `dicomnode worker` runs the tasks with `execute`, the same
code as the node's own threads. Series reach workers through shared storage: every worker mounts
the node's storage folder at the same path (results are written there too) and reads the same
configuration file (pipelines, destinations, result encoding).

A worker killed mid-job loses nothing: tasks are acknowledged only when done (`acks_late`), so
Redis hands an unfinished task to another worker after `visibility_timeout_seconds`. Each worker
runs one task at a time (solo pool): one per GPU keeps one GPU job per GPU.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from celery import Celery

from dicomnode.config import JobsSection, NodeConfig
from dicomnode.jobs import Job
from dicomnode.scu import SendError

if TYPE_CHECKING:
    from dicomnode.node import Node

log = logging.getLogger("dicomnode.celery")
TASK = "dicomnode.run_job"


def broker_address(jobs: JobsSection) -> str:
    """host:port of the broker, for messages (never its password)."""
    url = urlsplit(jobs.broker)
    return f"{url.hostname}:{url.port or 6379}"


def celery_app(jobs: JobsSection) -> Celery:
    app = Celery("dicomnode", broker=jobs.broker, backend=jobs.broker)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_track_started=True, result_expires=86400, task_default_queue=jobs.queue,
        # Redis sweeps for unacknowledged tasks every interval x throttle seconds (default 10 x 10):
        # sweep often enough that a killed worker's task moves on soon after the visibility timeout.
        broker_transport_options={"visibility_timeout": jobs.visibility_timeout_seconds, "unacked_restore_throttle": 1,
                                  "unacked_restore_interval": max(1, min(10, int(jobs.visibility_timeout_seconds / 2)))},
        broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
    )
    return app


class CeleryDispatcher:
    """The node's side: due jobs become tasks; finished tasks become done or failed jobs."""

    def __init__(self, node: "Node", devices: list[str]):
        self.node, self.devices = node, devices
        self.app = celery_app(node.cfg.jobs)
        self.running: dict[int, tuple[Job, str, float]] = {}  # job id -> (job, task id, start)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            busy = self._submit_due() | self._collect()
            if not busy:
                stop.wait(0.2)

    def _submit_due(self) -> bool:
        submitted = False
        for device in self.devices:
            job = self.node.jobs.claim(device)
            if job is None:
                continue
            t0 = self.node.started(job)
            task_id = f"dicomnode-job-{job.id}-attempt-{job.attempts}"
            try:
                self.app.send_task(TASK, args=[self.node.task(job)], task_id=task_id, queue=self.node.cfg.jobs.queue)
            except SendError as e:  # results for a sender that has no address
                self.node.failed(job, f"SendError: {e}", t0)
                continue
            except Exception as e:  # broker or result backend down: retried with back-off, on a fresh connection
                first_line = next((x for x in str(e).splitlines() if x.strip()), "")
                self.node.failed(job, f"cannot queue the task on the Celery broker {broker_address(self.node.cfg.jobs)} "
                                      f"({type(e).__name__}: {first_line})", t0)
                self.app = celery_app(self.node.cfg.jobs)
                continue
            self.running[job.id] = (job, task_id, t0)
            submitted = True
        return submitted

    def _collect(self) -> bool:
        changed = False
        timeout = self.node.cfg.jobs.task_timeout_seconds
        for job_id, (job, task_id, t0) in list(self.running.items()):
            try:
                result = self.app.AsyncResult(task_id)
                state = result.state
            except Exception as e:  # the result backend is unreachable for now: ask again later
                log.warning("cannot read the state of job %d from the Celery backend: %s", job_id, e)
                continue
            if state == "SUCCESS":
                self.node.finished(job, result.result, t0)
            elif state == "FAILURE":
                exc = result.result
                self.node.failed(job, f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc), t0)
            elif time.time() - t0 > timeout:
                self.node.failed(job, f"no Celery worker finished it within {timeout:g} s (is a `dicomnode worker` running?)", t0)
            else:
                continue
            result.forget()
            del self.running[job_id]
            changed = True
        return changed


def run_worker(cfg: NodeConfig, name: str | None = None, threads: int | None = None) -> None:
    """`dicomnode worker`: run tasks from the queue until stopped. `threads` caps PyTorch's CPU
    threads, so that several workers on one machine do not oversubscribe its cores."""
    from dicomnode.execute import execute

    if threads:
        import torch

        torch.set_num_threads(threads)
    from pipelines import registry
    from structured_reports.model import ResultOptions

    registry.load_plugins(cfg.plugins)
    options = ResultOptions(**cfg.results.model_dump())
    app = celery_app(cfg.jobs)

    @app.task(name=TASK)
    def run_job(task: dict) -> dict:
        return execute(task, cfg, options)

    app.worker_main(["worker", "--pool", "solo", "--queues", cfg.jobs.queue, "--loglevel", "INFO",
                     "--hostname", name or f"dicomnode@{socket.gethostname()}", "--without-gossip", "--without-mingle"])
