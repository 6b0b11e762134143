"""SEG, TID 1500 SR and Grad-CAM objects, checked by the standard's tools (dciodvfy, dsrdump,
dcmqi), by a real Orthanc, and by reading them back: built here from the phantom's truth, so
what is tested is the builder, not a model."""

from __future__ import annotations

import io
import json
import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from structured_reports import codes
from structured_reports.explain import build_gradcam_map, build_gradcam_overlay
from structured_reports.model import Algorithm, Finding, Segment
from structured_reports.reader import read_seg, read_sr
from structured_reports.seg import build_seg
from structured_reports.sr import build_sr
from tests.conftest import dciodvfy_errors, patient_coords
from tests.node_helpers import Orthanc, dcmtk
from training.phantom.results import TruthResults, truth_results

ALGORITHM = Algorithm("dicomnode-test", "1.2.3")
BIN = Path(__file__).resolve().parents[1] / ".venv" / "bin"


@dataclass
class Built:
    truth: TruthResults
    files: dict[str, Path]


def heatmap_for(src: pydicom.Dataset) -> np.ndarray:
    rows, cols = np.mgrid[0:src.Rows, 0:src.Columns]
    return np.exp(-(((rows - src.Rows / 2) / 20.0) ** 2 + ((cols - src.Columns / 2) / 30.0) ** 2)).astype(np.float32)


@pytest.fixture(scope="module")
def built(studies: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[Built]:
    out = []
    for study in studies:
        t = truth_results(study)
        folder = tmp_path_factory.mktemp(study.name)
        seg = build_seg(t.sources, t.segments, ALGORITHM)
        src = t.sources[len(t.sources) // 2]
        objects = {"seg": seg,
                   "seg-fractional-all-frames": build_seg(t.sources, t.segments, ALGORITHM, fractional=True,
                                                          omit_empty_frames=False),
                   "sr": build_sr(t.sources, t.findings, t.angles, ALGORITHM, seg=seg),
                   "gradcam": build_gradcam_map(src, heatmap_for(src), ALGORITHM, "disc herniation L4/L5"),
                   "gradcam-overlay": build_gradcam_overlay(src, heatmap_for(src), ALGORITHM, "disc herniation L4/L5")}
        files = {}
        for name, ds in objects.items():
            files[name] = folder / f"{name}.dcm"
            ds.save_as(files[name])
        out.append(Built(t, files))
    return out


def test_every_object_passes_dciodvfy(built: list[Built]) -> None:
    checked = 0
    for b in built:
        for name, path in b.files.items():
            assert dciodvfy_errors(path) == [], f"{name} of {path.parent.name}"
            checked += 1
    assert checked == 5 * len(built)


def test_objects_belong_to_the_source_study_and_say_what_they_are(built: list[Built]) -> None:
    for b in built:
        src = b.truth.sources[0]
        for name, path in b.files.items():
            ds = pydicom.dcmread(path)
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                       "AccessionNumber", "StudyDate"):
                assert ds.get(kw) == src.get(kw), f"{name}: {kw}"
            assert ds.SeriesInstanceUID != src.SeriesInstanceUID and 9901 <= int(ds.SeriesNumber) <= 9999
            assert ds.SeriesDescription.startswith("AI lumbar spine") and ds.Manufacturer == "dicomnode"
            assert any("dicomnode-test 1.2.3" in v for v in ds.SoftwareVersions)


def test_seg_segments_are_coded_coloured_and_reference_their_sources(built: list[Built]) -> None:
    ds = pydicom.dcmread(built[0].files["seg"])
    labels = [s.SegmentLabel for s in ds.SegmentSequence]
    assert {"L1 vertebral body", "L5 vertebral body", "S1 vertebral body", "L4/L5 intervertebral disc", "Spinal canal"} <= set(labels)
    for s in ds.SegmentSequence:
        key = next(k for k, v in codes.STRUCTURES.items() if v[1] == s.SegmentLabel)
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.STRUCTURES[key][0].value
        assert s.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        assert len(s.RecommendedDisplayCIELabValue) == 3 and s.SegmentAlgorithmName == "dicomnode-test"
    sources = {str(d.SOPInstanceUID) for d in built[0].truth.sources}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        refs = frame.DerivationImageSequence[0].SourceImageSequence
        assert str(refs[0].ReferencedSOPInstanceUID) in sources
    every = pydicom.dcmread(built[0].files["seg-fractional-all-frames"])
    assert every.SegmentationType == "FRACTIONAL"
    assert int(every.NumberOfFrames) == len(built[0].truth.sources) * len(labels) > int(ds.NumberOfFrames)


def test_round_trip_gives_back_the_same_inputs(built: list[Built]) -> None:
    for b in built:
        t = b.truth
        seg_ds = pydicom.dcmread(b.files["seg"])
        back = read_seg(seg_ds, t.sources)
        assert [s.structure for s in back] == [s.structure for s in t.segments]
        assert all(np.array_equal(a.mask, e.mask) for a, e in zip(back, t.segments))
        frac = read_seg(pydicom.dcmread(b.files["seg-fractional-all-frames"]), t.sources)
        assert all(np.abs(a.mask - e.mask).max() <= 1 / 255 for a, e in zip(frac, t.segments))
        report = read_sr(pydicom.dcmread(b.files["sr"]), seg_ds)
        assert report.findings == t.findings
        assert {f.grade for f in t.findings} > {"normal_mild"}  # several grades travel, not one
        assert [(a.span, a.degrees, a.category, a.sop_instance_uid) for a in report.angles] == \
            [(a.span, round(a.degrees, 3), a.category, a.sop_instance_uid) for a in t.angles]
        for got, want in zip(report.angles, t.angles):  # GraphicData is 32-bit float
            assert np.allclose(np.array([(ln.start, ln.end) for ln in got.lines]),
                               np.array([(ln.start, ln.end) for ln in want.lines]), atol=1e-3)


def test_dsrdump_and_dcmqi_read_every_report(built: list[Built], tmp_path: Path) -> None:
    for b in built:
        sr = b.files["sr"]
        dump = subprocess.run(["dsrdump", str(sr)], capture_output=True, text=True)
        assert dump.returncode == 0 and dump.stderr == "", dump.stderr
        assert "Lumbar lordosis angle L1-S1" in dump.stdout and '(deg,UCUM,"Degree")' in dump.stdout
        out = tmp_path / f"{b.files['sr'].parent.name}.json"
        r = subprocess.run([str(BIN / "tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(out)],
                           capture_output=True, text=True)
        messages = [ln for ln in (r.stdout + r.stderr).splitlines() if ln and not ln.startswith("dcmqi repository URL")]
        assert r.returncode == 0 and messages == [], messages
        doc = json.loads(out.read_text())
        assert len(doc["Measurements"]) == len(b.truth.findings) + 1
        herniation = next(m for m in doc["Measurements"] if m["TrackingIdentifier"] == "disc_herniation L4/L5")
        want = next(f for f in b.truth.findings if f.kind == "disc_herniation" and f.level == "L4/L5")
        assert float(herniation["measurementItems"][0]["value"]) == pytest.approx(want.probability)
        lordosis = next(m for m in doc["Measurements"] if m["TrackingIdentifier"] == "lumbar lordosis")
        values = {i["quantity"]["CodeMeaning"]: float(i["value"]) for i in lordosis["measurementItems"]}
        assert values["Lumbar lordosis angle L1-S1"] == pytest.approx(b.truth.angles[0].degrees, abs=1e-3)
        assert all(i["units"]["CodeValue"] == "deg" for i in lordosis["measurementItems"])


def test_dcmqi_places_every_segment_on_the_truth_in_patient_space(built: list[Built], tmp_path: Path) -> None:
    """dcmqi writes each segment as a volume in patient space; sampled at the centres of the source
    pixels it must equal the truth labels voxel for voxel (rotated, shifted slices included)."""
    worst = 1.0
    for b in built:
        out = tmp_path / b.files["seg"].parent.name
        out.mkdir()
        r = subprocess.run([str(BIN / "segimage2itkimage"), "--inputDICOM", str(b.files["seg"]), "--outputDirectory",
                            str(out), "-t", "nrrd"], capture_output=True, text=True)
        assert r.returncode == 0 and "warn" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
        sources = b.truth.sources
        rows, cols = np.mgrid[0:sources[0].Rows, 0:sources[0].Columns]
        centres = np.stack([patient_coords(ds, rows.ravel(), cols.ravel()) for ds in sources])  # slice, pixel, xyz
        for number, segment in enumerate(b.truth.segments, start=1):
            image = sitk.ReadImage(str(out / f"{number}.nrrd"))
            volume = sitk.GetArrayFromImage(image)  # z, y, x
            direction = np.array(image.GetDirection()).reshape(3, 3)
            index = (np.linalg.inv(direction) @ (centres.reshape(-1, 3) - image.GetOrigin()).T).T / image.GetSpacing()
            ijk = np.rint(index).astype(int)
            assert np.abs(index - ijk).max() < 0.01, "source pixel centres must fall on dcmqi's voxel centres"
            inside = np.all((ijk >= 0) & (ijk < volume.shape[::-1]), axis=1)
            sampled = np.zeros(len(ijk), dtype=bool)
            sampled[inside] = volume[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]] > 0
            truth = segment.mask.ravel()
            dice = 2 * (sampled & truth).sum() / (sampled.sum() + truth.sum())
            worst = min(worst, dice)
            assert dice > 0.99, f"{segment.structure}: Dice {dice:.4f}"
            assert np.array_equal(sampled, truth) and (volume > 0).sum() == truth.sum()  # nothing outside either
    assert worst == 1.0


def test_an_angle_not_measured_is_in_the_report_without_a_value(built: list[Built], tmp_path: Path) -> None:
    """L1 or S1 outside the field of view: the angle is there, empty, qualified "Measurement failure"
    (CID 42), so a viewer shows it was tried; dciodvfy, dsrdump and dcmqi read it, and so do we."""
    t = built[0].truth
    [l1_s1] = [a for a in t.angles if a.span == "L1-S1"]
    for angles, unmeasured in (([l1_s1], ["L1-L5"]), ([], ["L1-S1", "L1-L5"])):
        path = tmp_path / f"sr-{len(angles)}.dcm"
        build_sr(t.sources, [], angles, ALGORITHM, unmeasured=unmeasured).save_as(path)
        assert dciodvfy_errors(path) == []
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True).stdout
        for span in unmeasured:
            assert f'"Lumbar lordosis angle {span}")=empty (114006,DCM,"Measurement failure")' in dump
        out = tmp_path / f"sr-{len(angles)}.json"
        r = subprocess.run([str(BIN / "tid1500reader"), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        [group] = json.loads(out.read_text())["Measurements"]
        values = {i["quantity"]["CodeMeaning"]: i["value"] for i in group["measurementItems"]}
        assert values == {**{f"Lumbar lordosis angle {a.span}": f"{round(a.degrees, 3):g}" for a in angles},
                          **{f"Lumbar lordosis angle {s}": "" for s in unmeasured}}
        report = read_sr(pydicom.dcmread(path))
        assert [a.span for a in report.angles] == [a.span for a in angles] and report.unmeasured == unmeasured
        if angles:
            assert report.angles[0].category is not None  # the class still follows the L1-S1 angle
        else:
            assert "qualitativeEvaluations" not in group  # and without it there is none
    with pytest.raises(KeyError, match="unknown angle 'L2-S1'"):
        build_sr(t.sources, [], [], ALGORITHM, unmeasured=["L2-S1"])


def test_an_angle_measured_over_several_slices_carries_its_spread(built: list[Built], tmp_path: Path) -> None:
    """The pipeline's angle is the median over the central slices: the SR says "Median" (CID 3627) and
    gives their interquartile range as the measurement's statistical property (TID 310/311), and an
    angle flagged for its spread is evaluated "Uncertain" in the group, which dciodvfy and dcmqi accept
    and we read back; an angle from one slice (the phantom truth) has neither."""
    t = built[0].truth
    angles = [replace(a, spread_deg=9.5, uncertain=True) if a.span == "L1-L5" else a for a in t.angles]
    path = tmp_path / "sr-spread.dcm"
    build_sr(t.sources, [], angles, ALGORITHM).save_as(path)
    assert dciodvfy_errors(path) == []
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True).stdout
    assert dump.count('"Interquartile Range of population")="9.5" (deg,UCUM,"Degree")') == 1
    assert dump.count('"Derivation")=(373099004,SCT,"Median")') == 1
    out = tmp_path / "sr-spread.json"
    r = subprocess.run([str(BIN / "tid1500reader"), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    [group] = json.loads(out.read_text())["Measurements"]
    properties = {i["quantity"]["CodeMeaning"]: [(p["numProperty"]["CodeValue"], p["numPropertyValue"])
                                                 for p in i.get("measurementNumProperties", [])]
                  for i in group["measurementItems"]}
    assert properties == {"Lumbar lordosis angle L1-S1": [], "Lumbar lordosis angle L1-L5": [("130614", "9.5")]}
    uncertain = [e["conceptCode"]["CodeMeaning"] for e in group["qualitativeEvaluations"]
                 if e["conceptValue"]["CodeMeaning"] == "Uncertain"]
    assert uncertain == ["Lumbar lordosis angle L1-L5"]  # the L1-S1 angle, not flagged, is not evaluated
    assert dump.count('"Lumbar lordosis angle L1-L5")=(64957009,SCT,"Uncertain")') == 1
    report = read_sr(pydicom.dcmread(path))
    assert [(a.span, a.spread_deg, a.uncertain) for a in report.angles] == [("L1-S1", None, False), ("L1-L5", 9.5, True)]

    def items(sequence: Sequence[pydicom.Dataset]) -> Iterator[pydicom.Dataset]:
        for item in sequence:
            yield item
            yield from items(item.get("ContentSequence", []))
    edited = pydicom.dcmread(path)
    for item in items(edited.ContentSequence):
        if item.ConceptNameCodeSequence[0].CodeValue == "LLA-L1L5":
            item.ConceptNameCodeSequence[0].CodeValue = "LLA-L2L5"
    with pytest.raises(ValueError, match=r"unknown lordosis angle code \('LLA-L2L5'"):
        read_sr(edited)  # an angle we do not know is named, not a bare StopIteration


def test_orthanc_accepts_every_object_and_serves_it_back_unchanged(built: list[Built], tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path, {}).start()
    try:
        files = list(built[0].files.values())
        r = subprocess.run([dcmtk("storescu"), "-R", "-aec", "ORTHANC", "127.0.0.1", str(orthanc.dicom_port), *map(str, files)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        for path in files:
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            found = orthanc.post("/tools/lookup", str(uid).encode())
            assert len(found) == 1 and found[0]["Type"] == "Instance", path.name
            served = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{found[0]['ID']}/file")))
            original = pydicom.dcmread(path)
            assert served == original, path.name
    finally:
        orthanc.stop()


@pytest.mark.parametrize("change,words", [
    (lambda t: {"segments": [Segment("L3", t.segments[0].mask[:, :5])]}, "has shape"),
    (lambda t: {"segments": [Segment("L7", t.segments[0].mask)]}, "unknown structure 'L7'"),
    (lambda t: {"findings": [Finding("disc_herniation", "L4/L5", 1.5)]}, "must lie in \\[0, 1\\]"),
    (lambda t: {"findings": [Finding("disc_herniation", "L9/L10", 0.5)]}, "unknown spinal level"),
    (lambda t: {"findings": [Finding("disc_herniation", "L4/L5", 0.5, segment="L4/L5")]}, "no SEG was given"),
    (lambda t: {"heatmap": np.full((3, 3), 0.5)}, "the map has shape"),
    (lambda t: {"heatmap": np.full((t.sources[0].Rows, t.sources[0].Columns), 2.0)}, "finite values in \\[0, 1\\]"),
])
def test_bad_inputs_are_refused_with_a_clear_message(built: list[Built], change, words: str) -> None:
    t = built[0].truth
    args = change(t)
    with pytest.raises((ValueError, KeyError), match=words):
        if "segments" in args:
            build_seg(t.sources, args["segments"], ALGORITHM)
        elif "findings" in args:
            build_sr(t.sources, args["findings"], [], ALGORITHM)
        else:
            build_gradcam_map(t.sources[0], args["heatmap"], ALGORITHM, "x")


def test_private_codes_are_documented() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "codes.md").read_text()
    private = [c for table in (codes.FINDINGS, codes.GRADES, codes.ANGLES) for c in table.values()
               if c.scheme_designator == codes.PRIVATE_SCHEME] + [codes.GRADE, codes.ENDPLATE_LINE]
    for c in private:
        assert re.search(rf"\|\s*`{re.escape(c.value)}`\s*\|\s*{re.escape(c.meaning)}\s*\|", doc), c


@pytest.mark.parametrize("results", [{}, {"seg_fractional": True, "seg_omit_empty_frames": False,
                                          "explanations": "secondary_capture"}])
def test_write_results_follows_the_node_configuration(built: list[Built], tmp_path: Path, results: dict) -> None:
    from dicomnode.config import parse_config
    from structured_reports.model import Explanation, ResultOptions
    from structured_reports.writer import write_results

    options = ResultOptions(**parse_config({"results": results}).results.model_dump())
    t = built[1].truth
    src = t.sources[len(t.sources) // 2]
    paths = write_results(tmp_path, t.sources, ALGORITHM, options, segments=t.segments, findings=t.findings,
                          angles=t.angles, explanations=[Explanation(str(src.SOPInstanceUID), heatmap_for(src), "canal stenosis")])
    assert [p.name for p in paths] == ["seg.dcm", "sr.dcm", "gradcam-1.dcm"]
    seg, explanation = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[2])
    assert seg.SegmentationType == ("FRACTIONAL" if options.seg_fractional else "BINARY")
    frames = len(t.sources) * len(t.segments)
    assert (int(seg.NumberOfFrames) == frames) == (not options.seg_omit_empty_frames)
    assert explanation.SOPClassUID.name == ("Secondary Capture Image Storage" if results else "Parametric Map Storage")
    assert explanation.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert all(dciodvfy_errors(p) == [] for p in paths)
