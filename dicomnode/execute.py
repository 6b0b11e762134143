"""One job's work, the same in the node's own worker threads and in Celery workers.

A task is a plain JSON-able dict made by the node from a job (paths on the storage that node and
workers share, a pipeline or destination name); the result is a dict. Nothing here touches the
node's databases, so a worker on another machine needs only the storage mount and the configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicomnode.config import DicomDestination, NodeConfig, RestDestination
from dicomnode.scu import Peer, SendError, post_instances, store
from dicomnode.security import dicom_client_context, resolve_secret
from pipelines import registry
from structured_reports.model import ResultOptions


def execute(task: dict[str, Any], cfg: NodeConfig, options: ResultOptions) -> dict[str, Any]:
    """Run a `process` task (a pipeline on files, results into `out`) or a `send` task (files to a destination)."""
    files = [Path(p) for p in task["files"]]
    missing = [p for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(files)} input files are not on the storage here (first: {missing[0]}); "
                                "workers must mount the node's storage at the same path")
    if task["kind"] == "process":
        out = Path(task["out"])
        out.mkdir(parents=True, exist_ok=True)
        produced = registry.get(task["pipeline"]).run(files, out, options)
        return {"outputs": [str(p) for p in produced]}
    name = task["destination"]
    dest = cfg.destinations.get(name)
    if dest is None:
        raise SendError(f"destination {name!r} is not in this configuration (known: {', '.join(cfg.destinations) or 'none'})")
    if isinstance(dest, RestDestination):
        n = post_instances(dest.url, files, dest.username, resolve_secret(dest.password, f"destinations: {name}"))
    else:
        n = store(peer(dest, f"destinations.{name}"), files, cfg.node.ae_title)
    return {"instances_sent": n}


def peer(dest: DicomDestination, where: str) -> Peer:
    """The DICOM peer of a configured destination, with its TLS context if it has one."""
    return Peer(dest.ae_title, dest.host, dest.port, dicom_client_context(dest.tls, where) if dest.tls else None)
