"""The REST API (Orthanc's conventions where they fit) and the administrators' web page.

Resources are named by their DICOM UIDs (Orthanc hashes them; a UID is what a PACS team already
has). Reads need a token unless they come from this machine and `api.local_reads` allows it;
writes always need `Authorization: Bearer <token>`. Handlers only read the node's stores or queue
work; nothing slow runs in a request except C-ECHO.
"""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from dicomnode import __version__
from dicomnode.config import ConfigError, DicomDestination, RestDestination, Rule
from dicomnode.execute import peer
from dicomnode.jobs import STATES, Job
from dicomnode.scu import SendError, echo
from dicomnode.storage import UID as UID_PATTERN

if TYPE_CHECKING:
    from dicomnode.node import Node

WEB = Path(__file__).resolve().parent / "web"
LOCAL = {"127.0.0.1", "::1", "localhost"}
UidPath = Annotated[str, PathParam(pattern=UID_PATTERN.pattern, max_length=64, description="a DICOM UID")]
NamePath = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
JobId = Annotated[int, PathParam(ge=1, le=2**63 - 1)]


class DryRun(BaseModel):
    """Either the attributes of a series (DICOM keywords) or the UID of a stored series."""

    model_config = ConfigDict(extra="forbid")
    attributes: dict[str, Any] | None = None
    series_uid: str | None = Field(None, pattern=UID_PATTERN.pattern, max_length=64)


class RuleOrder(BaseModel):
    model_config = ConfigDict(extra="forbid")
    names: list[str]


class StoreRequest(BaseModel):
    """Orthanc's body for `/modalities/{name}/store`: the studies, series or instances to send."""

    model_config = ConfigDict(extra="forbid")
    Resources: list[Annotated[str, Field(pattern=UID_PATTERN.pattern, max_length=64)]] = Field(min_length=1)


def _job(j: Job) -> dict[str, Any]:
    took = j.finished_at - j.started_at if j.finished_at and j.started_at else None
    return {"ID": j.id, "Type": j.kind, "State": j.state, "Pipeline": j.pipeline, "Destination": j.destination,
            "SeriesInstanceUID": j.series_uid, "StudyInstanceUID": j.study_uid, "Device": j.device, "Attempts": j.attempts,
            "MaxAttempts": j.max_attempts, "Error": j.last_error, "CreationTime": j.created_at, "StartTime": j.started_at,
            "CompletionTime": j.finished_at, "Seconds": round(took, 3) if took is not None else None, "Result": j.result,
            "Rule": j.payload.get("rule")}


def _caller(request: Request, write: bool) -> str:
    """Who is asking: the holder of the bearer token, or `local` for a read from this machine."""
    tokens: dict[str, str] = request.app.state.tokens
    header = request.headers.get("authorization", "")
    if header[:7].lower() == "bearer ":
        given = header[7:].strip().encode()
        for token, user in tokens.items():
            if hmac.compare_digest(given, token.encode()):
                return user
        raise HTTPException(401, "the bearer token is not valid", {"WWW-Authenticate": "Bearer"})
    if not write and request.app.state.local_reads and request.client is not None and request.client.host in LOCAL:
        return "local"
    what = "changes" if write else "reads from other machines"
    raise HTTPException(401, f"{what} need `Authorization: Bearer <token>`"
                        + ("" if tokens else "; this node has no token configured (api.token_file or DICOMNODE_API_TOKEN)"),
                        {"WWW-Authenticate": "Bearer"})


def _reader(request: Request) -> str:
    return _caller(request, write=False)


def _writer(request: Request) -> str:
    return _caller(request, write=True)


Reader = Annotated[str, Depends(_reader)]
Writer = Annotated[str, Depends(_writer)]


def create_app(node: "Node", tokens: dict[str, str]) -> FastAPI:
    """The API of a running node; `tokens` maps each accepted bearer token to who holds it."""
    api = node.cfg.api
    # No /docs or /redoc: their pages load Swagger UI from a CDN, which a hospital network may not reach.
    app = FastAPI(title="dicomnode", version=__version__, description=__doc__, docs_url=None, redoc_url=None)
    app.state.tokens, app.state.local_reads = tokens, api.local_reads

    def config_error(e: Exception) -> HTTPException:
        return HTTPException(422, str(e.args[0] if e.args else e))

    # ------------------------------------------------------------------ system

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness for load balancers: no token needed, nothing private."""
        return {"status": "ok", "version": __version__}

    @app.get("/system")
    def system(_: Reader) -> dict[str, Any]:
        cfg = node.cfg
        return {"Name": "dicomnode", "Version": __version__, "DicomAet": cfg.node.ae_title, "DicomPort": cfg.node.port,
                "DicomTls": cfg.node.tls is not None, "HttpPort": api.port, "RuleMode": cfg.rule_mode,
                "Receivers": {"Configured": cfg.node.receivers,
                              "Running": 1 + (node.receivers.running() if node.receivers else 0),
                              "OpenAssociations": node.open_associations()},
                "ConfigurationFile": str(node.config_path) if node.config_path else None}

    @app.get("/statistics")
    def statistics(_: Reader) -> dict[str, Any]:
        c = node.storage.counts()
        return {"CountStudies": c["studies"], "CountSeries": c["series"], "CountInstances": c["instances"],
                "TotalDiskSize": c["bytes"], "Jobs": node.jobs.counts()}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(_: Reader) -> str:
        """Prometheus text: C-STORE outcomes and latency, jobs by state, job durations, storage."""
        return node.metrics_text()

    @app.get("/tools/now", response_class=PlainTextResponse)
    def now(_: Reader) -> str:
        """The node's clock in UTC, as Orthanc writes it (YYYYMMDDTHHMMSS)."""
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime())

    @app.post("/tools/lookup", openapi_extra={"requestBody": {"required": True,
                                                            "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def lookup(request: Request, _: Reader) -> list[dict[str, str]]:
        """Which stored study, series or instance a UID (the plain-text body) names, as Orthanc's lookup."""
        uid = (await request.body()).decode(errors="replace").strip()
        if not UID_PATTERN.match(uid) or len(uid) > 64:
            raise HTTPException(422, "the body must be one DICOM UID (digits and dots)")
        if node.storage.instance(uid) is not None:
            return [{"ID": uid, "Type": "Instance", "Path": f"/instances/{uid}/file"}]
        if node.storage.series(uid) is not None:
            return [{"ID": uid, "Type": "Series", "Path": f"/series/{uid}"}]
        if node.storage.study_series(uid):
            return [{"ID": uid, "Type": "Study", "Path": f"/studies/{uid}"}]
        return []

    # ------------------------------------------------------------------ stored data

    @app.get("/studies")
    def studies(_: Reader, limit: int = Query(100, ge=1, le=10000), since: int = Query(0, ge=0, le=2**63 - 1)) -> list[dict[str, Any]]:
        return [{"ID": r["study_uid"], "Type": "Study", "CountSeries": r["series"], "CountInstances": r["instances"],
                 "Bytes": r["bytes"], "FirstReceived": r["first_at"], "LastReceived": r["last_at"]}
                for r in node.storage.studies(limit, since)]

    @app.get("/studies/{study_uid}")
    def study(study_uid: UidPath, _: Reader) -> dict[str, Any]:
        rows = node.storage.study_series(study_uid)
        if not rows:
            raise HTTPException(404, f"no study {study_uid} is stored")
        return {"ID": study_uid, "Type": "Study", "Series": [_series(r) for r in rows]}

    def _series(row: dict) -> dict[str, Any]:
        a = row["attributes"]
        return {"ID": row["series_uid"], "Type": "Series", "ParentStudy": row["study_uid"], "CountInstances": row["n_instances"],
                "CallingAet": row["calling_ae"], "FirstReceived": row["first_at"], "LastReceived": row["last_at"],
                "MainDicomTags": {k: a.get(k) for k in ("Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined",
                                                         "Manufacturer") if k in a}}

    @app.get("/series/{series_uid}")
    def series(series_uid: UidPath, _: Reader) -> dict[str, Any]:
        row = node.storage.series(series_uid)
        if row is None:
            raise HTTPException(404, f"no series {series_uid} is stored")
        return {**_series(row), "Instances": [r["sop_instance_uid"] for r in node.storage.series_instances(series_uid)]}

    @app.get("/instances/{sop_instance_uid}/file", response_class=FileResponse,
             responses={200: {"content": {"application/dicom": {}}}})
    def instance_file(sop_instance_uid: UidPath, _: Reader) -> FileResponse:
        row = node.storage.instance(sop_instance_uid)
        if row is None or not Path(row["path"]).is_file():
            raise HTTPException(404, f"no instance {sop_instance_uid} is stored")
        return FileResponse(row["path"], media_type="application/dicom", filename=f"{sop_instance_uid}.dcm")

    @app.get("/changes")
    def changes(_: Reader, since: int = Query(0, ge=0, le=2**63 - 1), limit: int = Query(100, ge=1, le=10000)) -> dict[str, Any]:
        """The audit log as Orthanc-style changes: `Seq` is the line number; poll with `since=Last`."""
        rows = node.audit.read_since(since, limit + 1)
        return {"Changes": [{"Seq": seq, "ChangeType": e.pop("event"), "Date": e.pop("time"), **e} for seq, e in rows[:limit]],
                "Done": len(rows) <= limit, "Last": rows[:limit][-1][0] if rows else since}

    # ------------------------------------------------------------------ jobs

    @app.get("/jobs")
    def jobs(_: Reader, state: str | None = Query(None, pattern="^(" + "|".join(STATES) + ")$"),
             limit: int = Query(100, ge=1, le=10000)) -> list[dict[str, Any]]:
        where, args = ("state=?", (state,)) if state else ("1=1", ())
        return [_job(j) for j in node.jobs.list(where, args, limit, newest_first=True)]

    def _get_job(job_id: int) -> Job:
        j = node.jobs.get(job_id)
        if j is None:
            raise HTTPException(404, f"there is no job {job_id}")
        return j

    @app.get("/jobs/{job_id}")
    def job(job_id: JobId, _: Reader) -> dict[str, Any]:
        return _job(_get_job(job_id))

    @app.post("/jobs/{job_id}/resubmit")
    def resubmit(job_id: JobId, who: Writer) -> dict[str, Any]:
        _get_job(job_id)
        try:
            j = node.jobs.retry(job_id)
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        node.audit.write("resubmitted", job=job_id, user=who)
        return _job(j)

    @app.get("/jobs/{job_id}/preview.png", response_class=FileResponse, responses={200: {"content": {"image/png": {}}}})
    def preview(job_id: JobId, _: Reader) -> FileResponse:
        """The job's SEG and SR drawn on a source slice (outlines, endplate lines, angles)."""
        png = node.preview(_get_job(job_id))
        if png is None:
            raise HTTPException(404, f"job {job_id} has no SEG and SR to show (yet)")
        return FileResponse(png, media_type="image/png")

    # ------------------------------------------------------------------ modalities (destinations)

    def _destinations() -> dict[str, Any]:
        return {k: v.model_dump(mode="json", exclude_none=True) | ({"password": "***"} if getattr(v, "password", None) else {})
                for k, v in node.cfg.destinations.items()}

    @app.get("/modalities")
    def modalities(_: Reader) -> dict[str, Any]:
        return _destinations()

    @app.get("/modalities/{name}")
    def modality(name: NamePath, _: Reader) -> dict[str, Any]:
        if name not in node.cfg.destinations:
            raise HTTPException(404, f"there is no destination named {name!r}")
        return _destinations()[name]

    @app.put("/modalities/{name}")
    def put_modality(name: NamePath, dest: DicomDestination | RestDestination, who: Writer) -> dict[str, Any]:
        try:
            node.editor.put_destination(name, dest, who)
        except ConfigError as e:
            raise config_error(e) from None
        return _destinations()[name]

    @app.delete("/modalities/{name}")
    def delete_modality(name: NamePath, who: Writer) -> dict[str, Any]:
        try:
            node.editor.delete_destination(name, who)
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None
        except ConfigError as e:
            raise config_error(e) from None
        return _destinations()

    @app.post("/modalities/{name}/echo")
    def echo_modality(name: NamePath, who: Writer) -> dict[str, Any]:
        dest = node.cfg.destinations.get(name)
        if not isinstance(dest, DicomDestination):
            raise HTTPException(404, f"there is no DICOM destination named {name!r}")
        t0 = time.perf_counter()
        try:
            status = echo(peer(dest, f"destinations.{name}"), node.cfg.node.ae_title, timeout=5)
        except (SendError, ConfigError) as e:
            raise HTTPException(502, str(e)) from None
        return {"Status": status, "Success": status == 0, "Seconds": round(time.perf_counter() - t0, 3)}

    @app.post("/modalities/{name}/store")
    def store_modality(name: NamePath, body: Annotated[StoreRequest, Body()], who: Writer) -> dict[str, Any]:
        """Queue a send job of the given studies, series or instances (asynchronous, as Orthanc with
        `"Asynchronous": true`); follow it at `/jobs/{ID}`."""
        if name not in node.cfg.destinations:
            raise HTTPException(404, f"there is no destination named {name!r}")
        try:
            job_id = node.send_stored(body.Resources, name, who)
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None
        return {"ID": job_id, "Path": f"/jobs/{job_id}"}

    # ------------------------------------------------------------------ rules

    def _rules() -> list[dict[str, Any]]:
        return [r.model_dump(mode="json") for r in node.cfg.rules]

    @app.get("/rules")
    def rules(_: Reader) -> list[dict[str, Any]]:
        return _rules()

    @app.get("/rules/{name}")
    def rule(name: NamePath, _: Reader) -> dict[str, Any]:
        for r in node.cfg.rules:
            if r.name == name:
                return r.model_dump(mode="json")
        raise HTTPException(404, f"there is no rule named {name!r}")

    @app.put("/rules/{name}")
    def put_rule(name: NamePath, body: Rule, who: Writer,
                 position: int | None = Query(None, ge=0, description="where to insert it; default: in place, or last")
                 ) -> list[dict[str, Any]]:
        if body.name != name:
            raise HTTPException(422, f"the rule in the body is named {body.name!r}, the path says {name!r}")
        try:
            node.editor.put_rule(body, who, position)
        except ConfigError as e:
            raise config_error(e) from None
        return _rules()

    @app.delete("/rules/{name}")
    def delete_rule(name: NamePath, who: Writer) -> list[dict[str, Any]]:
        try:
            node.editor.delete_rule(name, who)
        except KeyError as e:
            raise HTTPException(404, e.args[0]) from None
        return _rules()

    @app.post("/rules/order")
    def order_rules(body: RuleOrder, who: Writer) -> list[dict[str, Any]]:
        try:
            node.editor.order_rules(body.names, who)
        except ConfigError as e:
            raise config_error(e) from None
        return _rules()

    @app.post("/rules/dry-run")
    def dry_run(body: DryRun, _: Reader) -> dict[str, Any]:
        """Which rules a series would match, condition by condition; nothing is queued."""
        if (body.attributes is None) == (body.series_uid is None):
            raise HTTPException(422, "give either `attributes` or `series_uid`")
        attributes = body.attributes
        if body.series_uid is not None:
            row = node.storage.series(body.series_uid)
            if row is None:
                raise HTTPException(404, f"no series {body.series_uid} is stored")
            attributes = row["attributes"]
        return node.editor.dry_run(attributes or {})

    # ------------------------------------------------------------------ pipelines

    @app.get("/pipelines")
    def pipelines(_: Reader) -> list[dict[str, Any]]:
        return node.pipelines()

    if (WEB / "index.html").is_file():
        app.mount("/ui", StaticFiles(directory=WEB, html=True), name="ui")

    return app
