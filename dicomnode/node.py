"""The node: listener, durable storage, assembly, routing, job workers and delivery, wired up."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from dicomnode.assembly import Assembler
from dicomnode.audit import Audit
from dicomnode.config import ConfigError, DicomDestination, NodeConfig, RestDestination, Rule
from dicomnode.jobs import Job, JobStore
from dicomnode.routing import route
from dicomnode.scp import StoreSCP
from dicomnode.scu import Peer, SendError, post_instances, store
from dicomnode.storage import Identity, Storage
from pipelines import registry
from structured_reports.model import ResultOptions

log = logging.getLogger("dicomnode.node")


def gpu_count() -> int:
    """NVIDIA GPUs for GPU pipelines, from the driver's /proc entries: importing torch here would
    cost the receiving node half a GB before any job runs. CUDA_VISIBLE_DEVICES="" means none."""
    if not any(registry.get(n).device == "gpu" for n in registry.names()):
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = Path("/proc/driver/nvidia/gpus")
    n = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


class Node:
    def __init__(self, cfg: NodeConfig):
        self.cfg = cfg
        root = Path(cfg.node.storage)
        self.storage = Storage(root, cfg.accept.duplicates)
        self.audit = Audit(root / "audit.jsonl")
        self.jobs = JobStore(root / "jobs.sqlite", cfg.jobs.backoff_seconds)
        self.results = root / "results"
        self.assembler = Assembler({"series": cfg.assembly.series_quiet_seconds, "study": cfg.assembly.study_quiet_seconds},
                                   self.dispatch)
        self.scp = StoreSCP(cfg, self.storage, self.audit, self._received)
        self.result_options = ResultOptions(**cfg.results.model_dump())
        self.gpus = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "Node":
        registry.load_plugins(self.cfg.plugins)
        for rule in self.cfg.rules:
            for name in rule.pipelines:
                try:
                    registry.get(name)
                except KeyError as e:
                    raise ConfigError(f"rules: rule {rule.name!r}: {e.args[0]}") from None
        self.gpus = gpu_count()
        resumed = self.jobs.resume()
        if resumed:
            log.info("%d job(s) interrupted by the last stop are queued again", resumed)
        for row in self.storage.undispatched():
            if row["series_due"]:
                self.assembler.touch("series", row["series_uid"])
            if row["study_due"]:
                self.assembler.touch("study", row["study_uid"])
        self.assembler.start()
        pools = [("cpu", self.cfg.jobs.cpu_workers)] + [(f"gpu{i}", 1) for i in range(self.gpus)]
        for device, n in pools:
            for k in range(n):
                t = threading.Thread(target=self._work, args=(device,), name=f"worker-{device}-{k}", daemon=True)
                t.start()
                self._threads.append(t)
        if self.cfg.retention.days or self.cfg.retention.max_bytes:
            t = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
            t.start()
            self._threads.append(t)
        self.scp.start()
        return self

    def _housekeep(self) -> None:
        r = self.cfg.retention
        while True:
            removed = self.storage.housekeep(r.days, r.max_bytes, keep=self.jobs.pending())
            if removed:
                log.info("retention: removed %d instance(s)", removed)
                self.audit.write("deleted", instances=removed, reason="retention")
            if self._stop.wait(r.interval_seconds):
                return

    def stop(self) -> None:
        self.scp.stop()
        self.assembler.stop()
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self.jobs.close()
        self.storage.close()
        self.audit.close()

    # ------------------------------------------------------------------ routing

    def _received(self, ident: Identity) -> None:
        self.assembler.touch("series", ident.series_uid)
        self.assembler.touch("study", ident.study_uid)

    def _rules(self, scope: str) -> list[Rule]:
        return [r for r in self.cfg.rules if r.scope == scope]

    def _enqueue(self, rule: Rule, series_uid: str, study_uid: str, instances: int) -> list[int]:
        ids = []
        for name in rule.pipelines:
            device = "gpu0" if registry.get(name).device == "gpu" and self.gpus else "cpu"
            ids.append(self.jobs.enqueue("process", series_uid, study_uid, self.cfg.jobs.max_attempts, device=device,
                                         pipeline=name, payload={"rule": rule.name, "send_to": rule.send_to,
                                                                 "scope": rule.scope, "instances": instances}))
        return ids

    def dispatch(self, scope: str, uid: str) -> list[int]:
        return self.dispatch_study(uid) if scope == "study" else self.dispatch_series(uid)

    def dispatch_series(self, series_uid: str) -> list[int]:
        """Route a complete series: one process job per pipeline of each matching series rule."""
        row = self.storage.series(series_uid)
        if row is None:
            return []
        rules = route(self._rules("series"), row["attributes"], self.cfg.rule_mode)
        ids = [i for rule in rules for i in self._enqueue(rule, series_uid, row["study_uid"], row["n_instances"])]
        self.storage.mark_dispatched(series_uid, row["n_instances"])
        if rules:
            self.audit.write("routed", series_uid=series_uid, study_uid=row["study_uid"], rules=[r.name for r in rules],
                             jobs=ids, instances=row["n_instances"])
        elif not route(self._rules("study"), row["attributes"], "first"):
            log.info("series %s (%s, %r) matches no rule: stored, not processed", series_uid,
                     row["attributes"].get("Modality"), row["attributes"].get("SeriesDescription"))
            self.audit.write("unrouted", series_uid=series_uid, study_uid=row["study_uid"], instances=row["n_instances"])
        return ids

    def dispatch_study(self, study_uid: str) -> list[int]:
        """Route a complete study: a study rule matches when any of its series matches; its job gets the whole study
        (the first matching series stands for it, e.g. to find the sender)."""
        rows = self.storage.study_series(study_uid)
        if not rows:
            return []
        hits: dict[str, tuple[Rule, str]] = {}
        for row in rows:
            for rule in route(self._rules("study"), row["attributes"], self.cfg.rule_mode):
                hits.setdefault(rule.name, (rule, row["series_uid"]))
        if self.cfg.rule_mode == "first" and hits:
            first = next(r.name for r in self._rules("study") if r.name in hits)
            hits = {first: hits[first]}
        total = sum(r["n_instances"] for r in rows)
        ids = [i for rule, series_uid in hits.values() for i in self._enqueue(rule, series_uid, study_uid, total)]
        self.storage.mark_study_dispatched({r["series_uid"]: r["n_instances"] for r in rows})
        if hits:
            self.audit.write("routed", study_uid=study_uid, rules=list(hits), jobs=ids, instances=total, scope="study")
        return ids

    # ------------------------------------------------------------------ workers

    def _work(self, device: str) -> None:
        while not self._stop.is_set():
            job = self.jobs.claim(device)
            if job is None:
                self._stop.wait(0.05)
                continue
            t0 = time.time()
            self.audit.write("started", job=job.id, kind=job.kind, series_uid=job.series_uid,
                             pipeline=job.pipeline, destination=job.destination, attempt=job.attempts)
            try:
                result = self._process(job) if job.kind == "process" else self._send(job)
            except Exception as e:  # any failure is recorded on the job and retried with back-off
                reason = f"{type(e).__name__}: {e}"
                state = self.jobs.fail(job.id, reason)
                what = f"job {job.id} ({job.kind} {job.pipeline or job.destination}) attempt {job.attempts}/{job.max_attempts}"
                if state == "dead":
                    log.error("%s failed: %s; it is dead, `dicomnode retry` sends it again", what, reason)
                else:
                    log.warning("%s failed: %s; it will be retried", what, reason)
                self.audit.write("failed", job=job.id, kind=job.kind, state=state, reason=reason, seconds=round(time.time() - t0, 3))
                continue
            self.jobs.done(job.id, result)
            self.audit.write("finished" if job.kind == "process" else "sent", job=job.id, series_uid=job.series_uid,
                             seconds=round(time.time() - t0, 3), **result)

    def _process(self, job: Job) -> dict:
        study = job.payload.get("scope") == "study"
        files = self.storage.study_files(job.study_uid) if study else self.storage.series_files(job.series_uid)
        out = self.results / f"job-{job.id}"
        out.mkdir(parents=True, exist_ok=True)
        produced = registry.get(job.pipeline or "").run(files, out, self.result_options)
        for dest in job.payload.get("send_to", []):
            self.jobs.enqueue("send", job.series_uid, job.study_uid, self.cfg.jobs.send_max_attempts, destination=dest,
                              payload={"files": [str(p) for p in produced], "from_job": job.id})
        return {"outputs": len(produced)}

    def _send(self, job: Job) -> dict:
        files = [Path(p) for p in job.payload["files"]]
        dest = self._destination(job)
        if isinstance(dest, RestDestination):
            n = post_instances(dest.url, files, dest.username, dest.password)
        else:
            n = store(Peer(dest.ae_title, dest.host, dest.port), files, self.cfg.node.ae_title)
        return {"instances_sent": n}

    def _destination(self, job: Job) -> DicomDestination | RestDestination:
        if job.destination != "sender":
            return self.cfg.destinations[job.destination or ""]
        row = self.storage.series(job.series_uid) or {}
        caller = row.get("calling_ae")
        for d in self.cfg.destinations.values():
            if isinstance(d, DicomDestination) and d.ae_title == caller:
                return d
        raise SendError(f"results go back to the sender, but the calling AE {caller!r} has no address under destinations")
