"""The phantom's truth as the typed inputs of our result objects (`structured_reports.model`):
what a perfect pipeline would report. Tests build SEG/SR from it and compare the round trip;
evaluation compares a model's objects with it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from pipelines.lordosis import SR_GRADE
from structured_reports.codes import STRUCTURES
from structured_reports.model import Angle, Finding, Line, Region, Segment
from training.phantom.anatomy import LABEL_VALUES
from training.phantom.preview import read_series

ANGLE_LINES = {"L1-S1": ("L1_superior", "S1_superior"), "L1-L5": ("L1_superior", "L5_inferior")}


@dataclass
class TruthResults:
    sources: list[pydicom.Dataset]  # InstanceNumber order, the order of every mask
    labels: np.ndarray
    segments: list[Segment]
    findings: list[Finding]
    angles: list[Angle]


def to_pixel(ds: pydicom.Dataset, point_mm: np.ndarray) -> tuple[float, float]:
    """(column, row) SCOORD image coordinates of a patient-space point on this image's plane
    (0,0 is the top left corner of the top left pixel, so pixel centres are at +0.5)."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    d = np.asarray(point_mm, dtype=float) - np.asarray(ds.ImagePositionPatient, dtype=float)
    row_spacing, col_spacing = (float(x) for x in ds.PixelSpacing)
    return float(d @ iop[:3] / col_spacing + 0.5), float(d @ iop[3:] / row_spacing + 0.5)


def nearest_slice(sources: list[pydicom.Dataset], points_mm: np.ndarray) -> int:
    """Index of the slice whose plane passes closest to the points."""
    def distance(ds: pydicom.Dataset) -> float:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        n = np.cross(iop[:3], iop[3:])
        return float(np.abs((points_mm - np.asarray(ds.ImagePositionPatient, dtype=float)) @ n).mean())
    return int(np.argmin([distance(ds) for ds in sources]))


def _grade_probability(grade: str) -> float:
    return {"none": 0.05, "normal_mild": 0.1, "bulge": 0.4, "moderate": 0.7}.get(grade, 0.9)


def truth_results(study: Path, series_number: int = 1) -> TruthResults:
    study = Path(study)
    truth = json.loads((study / "truth" / "truth.json").read_text())
    entry = next(s for s in truth["series"] if s["series_number"] == series_number)
    _, sources = read_series(study / "dicom" / f"series_{series_number}")
    labels = np.load(study / "truth" / entry["labels_file"])["labels"]
    segments = [Segment(name, labels == LABEL_VALUES[name]) for name in STRUCTURES if name != "canal"]
    segments.append(Segment("canal", labels == LABEL_VALUES["canal"]))
    segments = [s for s in segments if s.mask.any()]

    endplates = {k: np.asarray(v, dtype=float) for k, v in truth["endplates_patient_mm"].items()}
    k = nearest_slice(sources, np.vstack(list(endplates.values())))
    mid = sources[k]
    angles = [Angle(span, float(truth["lordosis_deg"][span]), str(mid.SOPInstanceUID),
                    tuple(Line(to_pixel(mid, endplates[e][0]), to_pixel(mid, endplates[e][1])) for e in ends),  # type: ignore[arg-type]
                    category=SR_GRADE[truth["lordosis_class"]] if span == "L1-S1" else None)
              for span, ends in ANGLE_LINES.items()]

    boxes = {b["slice_index"]: b["discs"] for b in entry.get("boxes", [])}
    findings = []
    for level, t in truth["levels"].items():
        if "marrow" in t:  # a vertebra: Modic change of its bone marrow, cited by its SEG segment
            if t["marrow"] != "lesion" and any(s.structure == level for s in segments):
                grade = "modic_0" if t["marrow"] == "normal" else f"modic_{t['marrow'][-1]}"
                findings.append(Finding("modic_change", level, 0.05 if grade == "modic_0" else 0.9, grade, segment=level))
            continue
        box = boxes.get(k, {}).get(level)
        region = None
        if box is not None:
            x0, y0, x1, y1 = box
            region = Region(str(mid.SOPInstanceUID), ((x0, y0), (x1, y0), (x1, y1), (x0, y1)))
        findings.append(Finding("disc_herniation", level, _grade_probability(t["herniation"]), t["herniation"], region=region))
        findings.append(Finding("spinal_canal_stenosis", level, _grade_probability(t["spinal_canal_stenosis"]),
                                t["spinal_canal_stenosis"]))
        if any(s.structure == level for s in segments):
            findings.append(Finding("disc_degeneration", level, _grade_probability(t["disc_degeneration"]),
                                    t["disc_degeneration"], segment=level))
    return TruthResults(sources, labels, segments, findings, angles)


def render_docs(docs: Path, seed: int = 5) -> list[Path]:
    """Build SEG and SR of one phantom study from its truth, read them back and render the PNGs in
    docs/images: SEG outlines with the endplate lines, and the Grad-CAM of the shipped spine-seg
    model for the disc class inside the L4/L5 disc, as the Parametric Map carries it."""
    import tempfile

    from pipelines.series import pick_series
    from pipelines.spine_seg import DISC, load_model
    from structured_reports.explain import build_gradcam_map
    from structured_reports.model import Algorithm
    from structured_reports.reader import read_seg, read_sr
    from structured_reports.render import render_gradcam, render_slice
    from structured_reports.seg import build_seg
    from structured_reports.sr import build_sr
    from training.phantom.generator import PhantomOptions, generate_study

    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        generate_study(study, seed, PhantomOptions(contrasts=("T2",), max_matrix=384))
        t = truth_results(study)
        algo = Algorithm("phantom-truth", "docs")
        seg = build_seg(t.sources, t.segments, algo)
        sr = build_sr(t.sources, t.findings, t.angles, algo, seg=seg)
        segments, report = read_seg(seg, t.sources), read_sr(sr, seg)  # draw what the objects say
        k = [str(d.SOPInstanceUID) for d in t.sources].index(report.angles[0].sop_instance_uid)
        images = docs / "images"
        out = [render_slice(t.sources, k, segments, report.angles, images / "result_seg_lordosis.png",
                            "SEG outlines and lordosis endplate lines, read back from our SEG and SR")]
        series = pick_series(sorted((study / "dicom" / "series_1").glob("*.dcm")))
        ks = [str(d.SOPInstanceUID) for d in series.datasets].index(str(t.sources[k].SOPInstanceUID))
        order = [int(d.InstanceNumber) - 1 for d in series.datasets]
        model = load_model()
        heat = model.explain(series, ks, DISC, t.labels[order][ks] == LABEL_VALUES["L4/L5"])
        pm = build_gradcam_map(series.datasets[ks], heat, model.algorithm, "disc class inside the L4/L5 disc")
        out.append(render_gradcam(series.datasets[ks], pm.pixel_array.reshape(heat.shape), images / "result_gradcam.png",
                                  "Grad-CAM of spine-seg: disc class at L4/L5 (Parametric Map)"))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=render_docs.__doc__)
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    for p in render_docs(parser.parse_args().docs):
        print(p)
