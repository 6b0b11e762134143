"""`dicomnode process IN OUT`: the pipelines on a folder of DICOM files, without a network.

Series are grouped and routed exactly as the node routes them (or to the pipelines named on the
command line); each pipeline writes into OUT/<series or study UID>/<pipeline>/, and OUT/results.json
summarises the studies, their findings and the objects written.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicomnode.config import NodeConfig, Rule
from dicomnode.routing import route
from dicomnode.scp import routing_attributes
from pipelines import registry
from structured_reports.model import ResultOptions

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


def _run(name: str, files: list[Path], target: Path, out: Path, study: dict, series_uid: str, options: ResultOptions) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for p in registry.get(name).run(files, target, options):
        modality = str(pydicom.dcmread(p, stop_before_pixels=True).get("Modality", ""))
        study["outputs"].append({"modality": modality, "path": str(p.relative_to(out)), "pipeline": name,
                                 "series_instance_uid": series_uid})
    if (target / "findings.json").exists():  # what the pipeline measured, beside its objects
        study["findings"].update(json.loads((target / "findings.json").read_text()))


def process_folder(inp: Path, out: Path, cfg: NodeConfig, pipelines: list[str] | None = None) -> dict:
    """Run series rules on each series and study rules on each study, as the node does; or the
    named pipelines, each on what it reads (`Pipeline.scope`: every series, or the whole study)."""
    registry.load_plugins(cfg.plugins)
    out.mkdir(parents=True, exist_ok=True)
    options = ResultOptions(**cfg.results.model_dump())
    series_rules = [r for r in cfg.rules if r.scope == "series"]
    study_rules = [r for r in cfg.rules if r.scope == "study"]
    by_scope = {scope: [n for n in pipelines or [] if registry.get(n).scope == scope] for scope in ("series", "study")}
    studies: dict[str, dict] = {}
    study_hits: dict[str, dict[str, Rule]] = defaultdict(dict)
    study_files: dict[str, list[Path]] = defaultdict(list)
    for series_uid, items in read_series(inp).items():
        attrs = routing_attributes(items[0][1])
        study_uid = str(items[0][1].StudyInstanceUID)
        study = studies.setdefault(study_uid, {"study_instance_uid": study_uid, "findings": {}, "outputs": []})
        study_files[study_uid] += [p for p, _ in items]
        for rule in [] if pipelines is not None else route(study_rules, attrs, cfg.rule_mode):
            study_hits[study_uid].setdefault(rule.name, rule)
        if pipelines is not None:
            names = by_scope["series"]
        else:
            names = [n for r in route(series_rules, attrs, cfg.rule_mode) for n in r.pipelines]
        if not names and not study_hits[study_uid] and not by_scope["study"]:
            log.info("series %s (%r) matches no rule", series_uid, attrs.get("SeriesDescription"))
        for name in names:
            _run(name, [p for p, _ in items], out / series_uid / name, out, study, series_uid, options)
    for study_uid in studies:
        hits = list(study_hits[study_uid].values())
        rules = hits[:1] if cfg.rule_mode == "first" else hits
        for name in by_scope["study"] + [n for r in rules for n in r.pipelines]:
            _run(name, study_files[study_uid], out / study_uid / name, out, studies[study_uid], "", options)
    results = {"studies": list(studies.values())}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
