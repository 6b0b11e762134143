"""`dicomnode process IN OUT`: the pipelines on a folder of DICOM files, without a network.

Series are grouped and routed exactly as the node routes them (or to the pipelines named on the
command line); each pipeline writes into OUT/<series UID>/<pipeline>/, and OUT/results.json
summarises the studies, their findings and the objects written.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.config import NodeConfig
from dicomnode.routing import route
from dicomnode.scp import routing_attributes
from pipelines import registry

log = logging.getLogger("dicomnode.process")


def read_series(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """DICOM files under `folder` by Series Instance UID, in InstanceNumber order; others skipped."""
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    for p in sorted(x for x in Path(folder).rglob("*") if x.is_file()):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as e:
            log.warning("skipping %s: not a readable DICOM instance (%s)", p, type(e).__name__)
            continue
        series[uid].append((p, ds))
    for items in series.values():
        items.sort(key=lambda x: int(x[1].get("InstanceNumber", 0) or 0))
    return dict(series)


def process_folder(inp: Path, out: Path, cfg: NodeConfig, pipelines: list[str] | None = None) -> dict:
    registry.load_plugins(cfg.plugins)
    out.mkdir(parents=True, exist_ok=True)
    studies: dict[str, dict] = {}
    for series_uid, items in read_series(inp).items():
        first = items[0][1]
        names = pipelines if pipelines is not None else \
            [n for r in route(cfg.rules, routing_attributes(first), cfg.rule_mode) for n in r.pipelines]
        study = studies.setdefault(str(first.StudyInstanceUID),
                                   {"study_instance_uid": str(first.StudyInstanceUID), "findings": {}, "outputs": []})
        if not names:
            log.info("series %s (%r) matches no rule", series_uid, first.get("SeriesDescription"))
        for name in names:
            target = out / series_uid / name
            target.mkdir(parents=True, exist_ok=True)
            for p in registry.get(name).run([p for p, _ in items], target):
                modality = str(pydicom.dcmread(p, stop_before_pixels=True).get("Modality", ""))
                study["outputs"].append({"modality": modality, "path": str(p.relative_to(out)), "pipeline": name,
                                         "series_instance_uid": series_uid})
    results = {"studies": list(studies.values())}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
