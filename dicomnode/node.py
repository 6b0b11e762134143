"""The node: listener, durable storage, assembly, routing, job workers and delivery, wired up."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from dicomnode.admin import ConfigEditor
from dicomnode.api_server import ApiServer
from dicomnode.assembly import Assembler
from dicomnode.audit import Audit
from dicomnode.config import ConfigError, DicomDestination, NodeConfig, Rule
from dicomnode.execute import execute
from dicomnode.jobs import Job, JobStore
from dicomnode.metrics import Metrics
from dicomnode.receivers import Receivers
from dicomnode.routing import route
from dicomnode.scp import StoreSCP
from dicomnode.scu import SendError
from dicomnode.security import load_tokens
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
    def __init__(self, cfg: NodeConfig, config_path: Path | None = None):
        self.cfg, self.config_path = cfg, config_path
        root = Path(cfg.node.storage).resolve()
        self.storage = Storage(root, cfg.accept.duplicates)
        self.audit = Audit(root / "audit.jsonl")
        self.jobs = JobStore(root / "jobs.sqlite", cfg.jobs.backoff_seconds)
        self.results = root / "results"
        self.assembler = Assembler({"series": cfg.assembly.series_quiet_seconds, "study": cfg.assembly.study_quiet_seconds},
                                   self.dispatch)
        self.metrics = Metrics()
        self.scp = StoreSCP(cfg, self.storage, self.audit, self._received, self.metrics)
        self.editor = ConfigEditor(cfg, config_path, self.audit, registry.get)
        self.api: ApiServer | None = None
        self.receivers: Receivers | None = None
        self.result_options = ResultOptions(**cfg.results.model_dump())
        self.gpus = 0
        self._stop = threading.Event()
        self._render_lock = threading.Lock()
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
        if self.cfg.jobs.backend == "celery":
            from dicomnode.celery_jobs import CeleryDispatcher

            dispatcher = CeleryDispatcher(self, [device for device, _ in pools])
            self._threads.append(threading.Thread(target=dispatcher.run, args=(self._stop,), name="celery", daemon=True))
        else:
            self._threads += [threading.Thread(target=self._work, args=(device,), name=f"worker-{device}-{k}", daemon=True)
                              for device, n in pools for k in range(n)]
        for t in self._threads:
            t.start()
        if self.cfg.retention.days or self.cfg.retention.max_bytes:
            t = threading.Thread(target=self._housekeep, name="housekeeping", daemon=True)
            t.start()
            self._threads.append(t)
        if self.cfg.api.enabled:
            self.api = ApiServer(self, load_tokens(self.cfg.api)).start()
        extra = self.cfg.node.receivers - 1
        server = self.scp.start()
        if extra:
            self.receivers = Receivers(self.cfg, self._received, self.metrics).start(extra)
            server.handoff = self.receivers.handoff
        return self

    def open_associations(self) -> list[int]:
        """Open DICOM associations of the main process, then of each running receiver process."""
        local = self.scp.server.open if self.scp.server is not None else 0
        return [local, *(self.receivers.open_associations() if self.receivers else [])]

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
        if self.receivers is not None:
            self.receivers.stop()
        if self.api is not None:
            self.api.stop()
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
            t0 = self.started(job)
            try:
                result = execute(self.task(job), self.cfg, self.result_options)
            except Exception as e:  # any failure is recorded on the job and retried with back-off
                self.failed(job, f"{type(e).__name__}: {e}", t0)
            else:
                self.finished(job, result, t0)

    def started(self, job: Job) -> float:
        self.audit.write("started", job=job.id, kind=job.kind, series_uid=job.series_uid,
                         pipeline=job.pipeline, destination=job.destination, attempt=job.attempts)
        return time.time()

    def task(self, job: Job) -> dict:
        """What a worker needs to run a job: paths on the storage and a pipeline or destination name."""
        if job.kind == "process":
            study = job.payload.get("scope") == "study"
            files = self.storage.study_files(job.study_uid) if study else self.storage.series_files(job.series_uid)
            return {"job": job.id, "kind": "process", "pipeline": job.pipeline, "files": [str(p) for p in files],
                    "out": str(self.results / f"job-{job.id}")}
        return {"job": job.id, "kind": "send", "destination": self._destination_name(job), "files": job.payload["files"]}

    def finished(self, job: Job, result: dict, t0: float) -> None:
        """A job's work is done: queue the sends of its results, record it."""
        if job.kind == "process":
            for dest in job.payload.get("send_to", []):
                self.jobs.enqueue("send", job.series_uid, job.study_uid, self.cfg.jobs.send_max_attempts, destination=dest,
                                  payload={"files": result["outputs"], "from_job": job.id})
            result = {"outputs": len(result["outputs"])}
        self.jobs.done(job.id, result)
        self.audit.write("finished" if job.kind == "process" else "sent", job=job.id, series_uid=job.series_uid,
                         seconds=round(time.time() - t0, 3), **result)
        self._observe(job, "done", t0)

    def failed(self, job: Job, reason: str, t0: float) -> None:
        """A job's attempt failed: retry later with back-off, or dead after the last attempt."""
        state = self.jobs.fail(job.id, reason)
        what = f"job {job.id} ({job.kind} {job.pipeline or job.destination}) attempt {job.attempts}/{job.max_attempts}"
        if state == "dead":
            log.error("%s failed: %s; it is dead, `dicomnode retry` sends it again", what, reason)
        else:
            log.warning("%s failed: %s; it will be retried", what, reason)
        self.audit.write("failed", job=job.id, kind=job.kind, state=state, reason=reason, seconds=round(time.time() - t0, 3))
        self._observe(job, state, t0)

    def _observe(self, job: Job, outcome: str, t0: float) -> None:
        self.metrics.observe("dicomnode_job_seconds", time.time() - t0, kind=job.kind, outcome=outcome,
                             target=job.pipeline or job.destination or "")

    def _destination_name(self, job: Job) -> str:
        if job.destination != "sender":
            return job.destination or ""
        row = self.storage.series(job.series_uid) or {}
        caller = row.get("calling_ae")
        for name, d in self.cfg.destinations.items():
            if isinstance(d, DicomDestination) and d.ae_title == caller:
                return name
        raise SendError(f"results go back to the sender, but the calling AE {caller!r} has no address under destinations")

    # ------------------------------------------------------------------ for the API

    def send_stored(self, uids: list[str], destination: str, who: str) -> int:
        """Queue one send job of stored studies, series or instances (by UID) to a destination."""
        files: list[Path] = []
        first: tuple[str, str] | None = None
        for uid in uids:
            row = self.storage.instance(uid)
            if row is not None:
                found, where = [Path(row["path"])], (row["series_uid"], row["study_uid"])
            elif (series := self.storage.series(uid)) is not None:
                found, where = self.storage.series_files(uid), (uid, series["study_uid"])
            elif (study_files := self.storage.study_files(uid)):
                found, where = study_files, (self.storage.study_series(uid)[0]["series_uid"], uid)
            else:
                raise KeyError(f"no study, series or instance {uid} is stored")
            files += found
            first = first or where
        assert first is not None
        job_id = self.jobs.enqueue("send", first[0], first[1], self.cfg.jobs.send_max_attempts, destination=destination,
                                   payload={"files": [str(p) for p in files], "user": who})
        self.audit.write("send_requested", job=job_id, destination=destination, user=who, instances=len(files))
        return job_id

    def preview(self, job: Job) -> Path | None:
        """A PNG of a process job's results on a source slice, drawn once and kept with them: its SEG
        and SR, or those of the other pipelines on the same study (lordosis writes angles, spine-seg the SEG)."""
        folder = self.results / f"job-{job.id}"
        png = folder / "preview.png"
        if png.is_file():
            return png
        if job.kind != "process" or job.state != "done":
            return None
        siblings = self.jobs.list("kind='process' AND state='done' AND study_uid=? AND id<>?", (job.study_uid, job.id))
        folders = [folder] + [self.results / f"job-{j.id}" for j in siblings]
        seg = next((f / "seg.dcm" for f in folders if (f / "seg.dcm").is_file()), None)
        sr = next((f / "sr.dcm" for f in folders if (f / "sr.dcm").is_file()), None)
        if seg is None:
            return None
        import pydicom

        from structured_reports.render import render_result, seg_source_uids

        seg_ds = pydicom.dcmread(seg)
        rows = [self.storage.instance(uid) for uid in seg_source_uids(seg_ds)]
        sources = [pydicom.dcmread(r["path"]) for r in rows if r is not None]
        if not sources:
            return None
        with self._render_lock:  # pyplot keeps global state: one drawing at a time
            render_result(seg_ds, pydicom.dcmread(sr) if sr else None, sources, png, f"job {job.id}: {job.pipeline}")
        return png

    def pipelines(self) -> list[dict]:
        return [registry.get(n).describe() for n in registry.names()]

    def metrics_text(self) -> str:
        c = self.storage.counts()
        gauges = {
            "dicomnode_jobs": ("jobs by state", [({"state": s}, n) for s, n in self.jobs.counts().items()]),
            "dicomnode_stored_instances": ("instances in storage", [({}, c["instances"])]),
            "dicomnode_stored_bytes": ("bytes of instances in storage", [({}, c["bytes"])]),
            "dicomnode_associations_open": ("open DICOM associations by receiving process (0: the main process)",
                                            [({"process": str(i)}, n) for i, n in enumerate(self.open_associations())]),
        }
        return self.metrics.render(gauges, {"dicomnode_c_store_total": "C-STORE requests by DIMSE status",
                                            "dicomnode_c_store_seconds": "time in the C-STORE handler (decode, write, fsync, index)",
                                            "dicomnode_associations_rejected_total": "associations rejected (AE titles)",
                                            "dicomnode_receiver_restarts_total": "receiver processes started again after they exited",
                                            "dicomnode_job_seconds": "job run time by kind, outcome (done, failed, dead) and target "
                                                                     "(pipeline or destination)"})
