"""TID 1500 Measurement Report in a Comprehensive 3D SR: a measurement group per finding (site,
coded finding, grade, probability, image region or SEG segment) and one for the lumbar lordosis
(angles in degrees with their endplate lines as POLYLINEs on the slice they were measured on, each the
median over the central slices with their interquartile range, "Uncertain" where that spread calls for a
look at the lines; an angle that could not be measured, L1 or S1 outside the field of view say, is there
without a value, qualified "Measurement failure", so the radiologist's viewer shows that it was tried)."""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.coding import Code

from structured_reports import codes
from structured_reports.common import MANUFACTURER, PRIVATE_SCHEME, check_sources, equipment, new_series
from structured_reports.model import Algorithm, Angle, Finding, Region


def _tracking(label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(identifier=label[:64], uid=hd.UID())


def _source(sources: dict[str, Dataset], sop_uid: str) -> hd.sr.SourceImageForRegion:
    if sop_uid not in sources:
        raise ValueError(f"image {sop_uid} is not one of the source images of this report")
    return hd.sr.SourceImageForRegion(referenced_sop_class_uid=sources[sop_uid].SOPClassUID,
                                      referenced_sop_instance_uid=sop_uid)


def _region(sources: dict[str, Dataset], region: Region) -> hd.sr.ImageRegion:
    pts = np.asarray(region.points, dtype=float)
    if len(pts) == 1:
        return hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POINT, pts, _source(sources, region.sop_instance_uid))
    closed = np.vstack([pts, pts[:1]]) if not np.array_equal(pts[0], pts[-1]) else pts
    return hd.sr.ImageRegion(hd.sr.GraphicTypeValues.POLYLINE, closed, _source(sources, region.sop_instance_uid))


def _grade(code_key: str | None) -> list[hd.sr.QualitativeEvaluation]:
    if code_key is None:
        return []
    if code_key not in codes.GRADES:
        raise KeyError(f"unknown grade {code_key!r}; known: {', '.join(codes.GRADES)}")
    return [hd.sr.QualitativeEvaluation(codes.GRADE, codes.GRADES[code_key])]


def _finding_group(f: Finding, sources: dict[str, Dataset], seg: Dataset | None, algo: hd.sr.AlgorithmIdentification):
    if f.kind not in codes.FINDINGS:
        raise KeyError(f"unknown finding {f.kind!r}; known: {', '.join(codes.FINDINGS)}")
    if not 0.0 <= f.probability <= 1.0:
        raise ValueError(f"probability of {f.kind} at {f.level} is {f.probability}; it must lie in [0, 1]")
    common = dict(tracking_identifier=_tracking(f"{f.kind} {f.level}"), finding_type=codes.FINDINGS[f.kind],
                  finding_sites=[hd.sr.FindingSite(codes.site_of(f.level))],
                  measurements=[hd.sr.Measurement(codes.PROBABILITY, round(float(f.probability), 6), codes.NO_UNITS,
                                                  algorithm_id=algo)],
                  qualitative_evaluations=_grade(f.grade) or None, algorithm_id=algo)
    if f.segment is not None:
        if seg is None:
            raise ValueError(f"finding {f.kind} at {f.level} refers to segment {f.segment!r}, but no SEG was given")
        number = segment_number(seg, f.segment)
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number), **common)
    if f.region is not None:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=_region(sources, f.region), **common)
    return hd.sr.MeasurementsAndQualitativeEvaluations(**common)


def segment_number(seg: Dataset, structure: str) -> int:
    label = codes.STRUCTURES[structure][1]
    for item in seg.SegmentSequence:
        if item.SegmentLabel == label:
            return int(item.SegmentNumber)
    raise ValueError(f"the SEG has no segment {label!r}")


def _angle_code(span: str) -> Code:
    if span not in codes.ANGLES:
        raise KeyError(f"unknown angle {span!r}; known: {', '.join(codes.ANGLES)}")
    return codes.ANGLES[span]


def _failed(span: str, algo: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    """The angle's NUM item qualified "Measurement failure"; `_drop_failed_values` removes its value."""
    return hd.sr.Measurement(_angle_code(span), 0.0, codes.DEGREE, qualifier=codes.MEASUREMENT_FAILURE, algorithm_id=algo)


def _drop_failed_values(items: Sequence[Dataset]) -> None:
    """highdicom writes (and reads back) every NUM item with a value; a failed measurement has none:
    the Measured Value Sequence is Type 2, left empty, and the qualifier says why (PS3.3, Numeric Measurement Macro)."""
    for item in items:
        qualifier = item.get("NumericValueQualifierCodeSequence")
        failed = bool(qualifier) and (qualifier[0].CodeValue, qualifier[0].CodingSchemeDesignator) == \
            (codes.MEASUREMENT_FAILURE.value, codes.MEASUREMENT_FAILURE.scheme_designator)
        if item.ValueType == "NUM" and failed:
            item.MeasuredValueSequence = []
        if "ContentSequence" in item:
            _drop_failed_values(item.ContentSequence)


def _over_slices(a: Angle) -> dict:
    """An angle that is the median over several slices says so, with their interquartile range (TID 311)."""
    if a.spread_deg is None:
        return {}
    spread = hd.sr.NumContentItem(codes.INTERQUARTILE_RANGE, round(float(a.spread_deg), 3), codes.DEGREE,
                                  relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)
    statistics = hd.sr.MeasurementStatisticalProperties(
        [spread], description="the angle on each sagittal slice through the vertebral midline")
    return {"derivation": codes.MEDIAN,
            "properties": hd.sr.MeasurementProperties(measurement_statistical_properties=statistics)}


def _lordosis_group(angles: Sequence[Angle], unmeasured: Sequence[str], sources: dict[str, Dataset],
                    algo: hd.sr.AlgorithmIdentification):
    measurements = []
    for a in angles:
        lines = [hd.sr.CoordinatesForMeasurement(hd.sr.GraphicTypeValues.POLYLINE,
                                                 np.array([ln.start, ln.end], dtype=float),
                                                 _source(sources, a.sop_instance_uid), purpose=codes.ENDPLATE_LINE)
                 for ln in a.lines]
        measurements.append(hd.sr.Measurement(_angle_code(a.span), round(float(a.degrees), 3), codes.DEGREE,
                                              algorithm_id=algo, referenced_coordinates=lines, **_over_slices(a)))
    measurements += [_failed(span, algo) for span in unmeasured]
    category = next((a.category for a in angles if a.category), None)
    flags = [hd.sr.QualitativeEvaluation(_angle_code(a.span), codes.UNCERTAIN) for a in angles if a.uncertain]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking("lumbar lordosis"), finding_type=codes.FINDINGS["lumbar_lordosis"],
        finding_sites=[hd.sr.FindingSite(codes.LUMBAR_SPINE)], measurements=measurements,
        qualitative_evaluations=_grade(category) + flags or None, algorithm_id=algo)


def build_sr(sources: Sequence[Dataset], findings: Sequence[Finding], angles: Sequence[Angle], algorithm: Algorithm,
             seg: Dataset | None = None, unmeasured: Sequence[str] = ()) -> hd.sr.Comprehensive3DSR:
    """The report of one run over `sources` (all one study); `seg` is the SEG that volumetric findings cite;
    `unmeasured` the lordosis spans ("L1-S1", "L1-L5") tried and not measured."""
    check_sources(sources)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    algo = hd.sr.AlgorithmIdentification(algorithm.name, algorithm.version)
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name=algorithm.name[:64], manufacturer_name=MANUFACTURER,
                                                       model_name=equipment(algorithm)["software_versions"][0])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=Code("121007", "DCM", "Device"), observer_identifying_attributes=device))
    groups = [_finding_group(f, by_uid, seg, algo) for f in findings]
    if angles or unmeasured:
        groups.append(_lordosis_group(angles, unmeasured, by_uid, algo))
    report = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.IMAGING_PROCEDURE,
                                     imaging_measurements=groups or None)
    evidence = list(sources) + ([seg] if seg is not None else [])
    sr = hd.sr.Comprehensive3DSR(evidence=evidence, content=report[0], **new_series("sr"), **equipment(algorithm),
                                 is_complete=True, is_final=False, is_verified=False, coding_schemes=[PRIVATE_SCHEME])
    _drop_failed_values(sr.ContentSequence)
    return sr
