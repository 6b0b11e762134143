"""Our SEG and SR read back into the typed inputs they were built from: used by the tests (round
trip) and by evaluation, which compares a model's objects with the truth."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from structured_reports import codes
from structured_reports.model import Angle, Finding, Line, Region, Report, Segment

MEASUREMENT_GROUP = ("125007", "DCM")
FINDING = ("121071", "DCM")
FINDING_SITE = ("363698007", "SCT")
IMAGE_REGION = ("111030", "DCM")
UNCERTAIN = (codes.UNCERTAIN.value, codes.UNCERTAIN.scheme_designator)


def _key(item: Dataset, attr: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = getattr(item, attr)[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def _lookup(table: dict, item: Dataset, what: str, attr: str = "ConceptCodeSequence") -> str:
    value = _key(item, attr)
    for name, code in table.items():
        if (code.value, code.scheme_designator) == value:
            return name
    raise ValueError(f"unknown {what} code {value} in the report")


def _sites() -> dict:
    return {**codes.DISC_LEVELS, **codes.VERTEBRAE, "lumbar spine": codes.LUMBAR_SPINE}


def _image_uid(item: Dataset) -> str:
    return str(item.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def read_seg(seg: Dataset, sources: Sequence[Dataset]) -> list[Segment]:
    """The segments of `seg` as masks over `sources` (in that order); frames the SEG omitted are empty.
    Fractional SEGs come back as probabilities in [0, 1]."""
    seg = hd.seg.Segmentation.from_dataset(seg, copy=True)
    labels = {label: key for key, (_, label, _) in codes.STRUCTURES.items()}
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources], segment_numbers=numbers,
        ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    if seg.segmentation_type != hd.seg.SegmentationTypeValues.FRACTIONAL:
        pixels = pixels.astype(bool)
    return [Segment(labels.get(str(item.SegmentLabel), str(item.SegmentLabel)), pixels[..., i])
            for i, item in enumerate(seg.SegmentSequence)]


def read_sr(sr: Dataset, seg: Dataset | None = None) -> Report:
    """Findings and angles of one of our TID 1500 reports; `seg` names the segments findings cite."""
    segment_names = {}
    if seg is not None:
        labels = {label: key for key, (_, label, _) in codes.STRUCTURES.items()}
        segment_names = {int(s.SegmentNumber): labels.get(str(s.SegmentLabel), str(s.SegmentLabel)) for s in seg.SegmentSequence}
    report = Report()
    for group in _groups(sr):
        kind = level = grade = None
        probability, region, segment, angles, unmeasured, uncertain = None, None, None, [], [], []
        for item in group.ContentSequence:
            concept = _key(item)
            if concept == FINDING:
                kind = _lookup(codes.FINDINGS, item, "finding")
            elif concept == FINDING_SITE:
                level = _lookup(_sites(), item, "finding site")
            elif item.ValueType == "CODE" and concept == (codes.GRADE.value, codes.GRADE.scheme_designator):
                grade = _lookup(codes.GRADES, item, "grade")
            elif item.ValueType == "CODE" and _key(item, "ConceptCodeSequence") == UNCERTAIN:
                uncertain.append(_span(item))
            elif item.ValueType == "NUM" and concept == (codes.PROBABILITY.value, codes.PROBABILITY.scheme_designator):
                probability = float(item.MeasuredValueSequence[0].NumericValue)
            elif item.ValueType == "NUM" and not item.get("MeasuredValueSequence"):
                unmeasured.append(_span(item))
            elif item.ValueType == "NUM":
                angles.append(_angle(item))
            elif item.ValueType == "SCOORD" and concept == IMAGE_REGION:
                pts = np.asarray(item.GraphicData, dtype=float).reshape(-1, 2)
                if item.GraphicType == "POLYLINE" and len(pts) > 1 and np.array_equal(pts[0], pts[-1]):
                    pts = pts[:-1]
                region = Region(_image_uid(item), tuple((float(x), float(y)) for x, y in pts))
            elif item.ValueType == "IMAGE" and hasattr(item, "ReferencedSOPSequence") and \
                    "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]:
                number = int(item.ReferencedSOPSequence[0].ReferencedSegmentNumber)
                segment = segment_names.get(number, f"segment {number}")
        if kind == "lumbar_lordosis":
            # the lordosis category is defined on the L1-S1 angle (hypo / normal / hyper thresholds)
            report.angles += [replace(a, category=grade if a.span == "L1-S1" else None, uncertain=a.span in uncertain)
                              for a in angles]
            report.unmeasured += unmeasured
        elif kind is not None and level is not None and probability is not None:
            report.findings.append(Finding(kind, level, probability, grade, region, segment))
    return report


def _groups(sr: Dataset) -> list[Dataset]:
    found = []

    def walk(items: Sequence[Dataset]) -> None:
        for item in items:
            if item.ValueType == "CONTAINER" and _key(item) == MEASUREMENT_GROUP:
                found.append(item)
            elif "ContentSequence" in item:
                walk(item.ContentSequence)
    walk(sr.ContentSequence)
    return found


def _span(item: Dataset) -> str:
    return _lookup(codes.ANGLES, item, "lordosis angle", "ConceptNameCodeSequence")


def _angle(item: Dataset) -> Angle:
    span = _span(item)
    lines, uid, spread = [], "", None
    for child in item.ContentSequence:
        if child.ValueType == "SCOORD":
            (x0, y0), (x1, y1) = np.asarray(child.GraphicData, dtype=float).reshape(2, 2)
            lines.append(Line((float(x0), float(y0)), (float(x1), float(y1))))
            uid = _image_uid(child)
        elif child.ValueType == "NUM" and _key(child) == (codes.INTERQUARTILE_RANGE.value, codes.INTERQUARTILE_RANGE.scheme_designator):
            spread = float(child.MeasuredValueSequence[0].NumericValue)
    return Angle(span, float(item.MeasuredValueSequence[0].NumericValue), uid, tuple(lines), spread_deg=spread)  # type: ignore[arg-type]
