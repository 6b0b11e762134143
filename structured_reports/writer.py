"""One call for a pipeline: build every result object of a run as configured and write them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pydicom import Dataset

from structured_reports.explain import build_gradcam_map, build_gradcam_overlay
from structured_reports.model import Algorithm, Angle, Explanation, Finding, ResultOptions, Segment
from structured_reports.seg import build_seg
from structured_reports.sr import build_sr


def write_results(out: Path, sources: Sequence[Dataset], algorithm: Algorithm, options: ResultOptions = ResultOptions(), *,
                  segments: Sequence[Segment] = (), findings: Sequence[Finding] = (), angles: Sequence[Angle] = (),
                  unmeasured: Sequence[str] = (), explanations: Sequence[Explanation] = ()) -> list[Path]:
    """SEG (if segments), SR (if findings, angles or angles not measured; citing the SEG) and one
    explanation object per map, written to `out` as <kind>.dcm / gradcam-<n>.dcm; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    objects: list[tuple[str, Dataset]] = []
    seg = None
    if segments:
        seg = build_seg(sources, segments, algorithm, fractional=options.seg_fractional,
                        omit_empty_frames=options.seg_omit_empty_frames)
        objects.append(("seg", seg))
    if findings or angles or unmeasured:
        objects.append(("sr", build_sr(sources, findings, angles, algorithm, seg=seg, unmeasured=unmeasured)))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    build = {"parametric_map": build_gradcam_map, "secondary_capture": build_gradcam_overlay}[options.explanations]
    for n, e in enumerate(explanations, start=1):
        if e.sop_instance_uid not in by_uid:
            raise ValueError(f"explanation {e.decision!r} refers to image {e.sop_instance_uid}, not a source of this run")
        objects.append((f"gradcam-{n}", build(by_uid[e.sop_instance_uid], e.heatmap, algorithm, e.decision)))
    paths = []
    for name, ds in objects:
        path = out / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
