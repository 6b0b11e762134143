"""The generator writes valid DICOM that reads back as a correctly oriented volume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from tests.conftest import STUDY_CASES, dciodvfy_errors, load_truth, patient_coords, read_series
from training.phantom.anatomy import LABEL_VALUES
from training.phantom.generator import PhantomOptions, generate_study


def test_every_file_passes_dciodvfy(studies: list[Path]) -> None:
    checked, errors = 0, {}
    for study in studies:
        for f in sorted((study / "dicom").rglob("*.dcm")):
            e = dciodvfy_errors(f)
            checked += 1
            if e:
                errors[str(f)] = e
    assert checked > 150
    assert not errors, f"{len(errors)} of {checked} files fail dciodvfy, e.g. {next(iter(errors.items()))}"


def test_truth_has_the_spec_keys_and_one_label_slice_per_instance(studies: list[Path]) -> None:
    for study, (seed, opts) in zip(studies, STUDY_CASES):
        truth = load_truth(study)
        assert truth["study_class"] in ("healthy", "herniated_disc", "spinal_stenosis", "spondylosis")
        if opts.study_class:
            assert truth["study_class"] == opts.study_class
        assert set(truth["lordosis_deg"]) == {"L1-S1", "L1-L5"}
        assert {"L1", "L5", "S1", "L1/L2", "L5/S1"} <= set(truth["levels"])
        assert truth["levels"]["L4/L5"]["canal_stenosis"] in ("normal_mild", "moderate", "severe")
        assert len(truth["series"]) == len(opts.contrasts) + int(opts.axial)
        for s in truth["series"]:
            vol, headers = read_series(study / "dicom" / f"series_{s['series_number']}")
            labels = np.load(study / "truth" / s["labels_file"])["labels"]
            assert labels.shape == vol.shape
            assert {h.SeriesInstanceUID for h in headers} == {s["series_instance_uid"]}
            assert {h.StudyInstanceUID for h in headers} == {truth["study_instance_uid"]}
            assert s["label_values"]["L1"] == 1 and s["label_values"]["canal"] == 30


def _centroid(labels: np.ndarray, headers: list, value: int) -> np.ndarray:
    pts = [patient_coords(h, *np.nonzero(labels[k] == value)) for k, h in enumerate(headers)]
    pts = np.concatenate([p for p in pts if len(p)])
    return pts.mean(axis=0)


def test_labels_are_anatomically_placed_in_patient_space(studies: list[Path]) -> None:
    """From the headers alone: L1 above S1, the canal behind the bodies, T2 CSF bright on the canal."""
    for study in studies:
        for s in load_truth(study)["series"]:
            vol, headers = read_series(study / "dicom" / f"series_{s['series_number']}")
            labels = np.load(study / "truth" / s["labels_file"])["labels"]
            l1, l3, s1 = (_centroid(labels, headers, LABEL_VALUES[k]) for k in ("L1", "L3", "S1"))
            canal = _centroid(labels, headers, LABEL_VALUES["canal"])
            assert l1[2] > l3[2] > s1[2], "L1 must be superior (+z) to L3 and S1"
            assert canal[1] > l3[1] + 15, "the canal must be posterior (+y) to the bodies"
            if s["contrast"] == "T2":
                assert vol[labels == LABEL_VALUES["canal"]].mean() > 1.3 * vol[labels == LABEL_VALUES["L3"]].mean()
            if s["contrast"] == "T1":  # fatty marrow is brighter than disc on T1
                assert vol[labels == LABEL_VALUES["L3"]].mean() > vol[labels == LABEL_VALUES["L3/L4"]].mean()


def test_simpleitk_reads_the_same_geometry(studies: list[Path]) -> None:
    for study in studies:
        for s in load_truth(study)["series"]:
            if not s["description"].startswith("SAG"):
                continue  # the axial series has one slice block per disc: not one volume
            folder = study / "dicom" / f"series_{s['series_number']}"
            vol, headers = read_series(folder)
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
            img = reader.Execute()
            arr = sitk.GetArrayFromImage(img)
            assert arr.shape == vol.shape
            for k in (0, arr.shape[0] - 1):
                p = np.array(img.TransformIndexToPhysicalPoint((0, 0, k)))
                # SimpleITK sorts by position: find the instance at that position.
                match = [i for i, h in enumerate(headers) if np.allclose(np.array(h.ImagePositionPatient, float), p, atol=1e-3)]
                assert len(match) == 1
                slope = float(getattr(headers[0], "RescaleSlope", 1))
                assert np.allclose(arr[k], vol[match[0]] * slope, rtol=1e-5)
                end = np.array(img.TransformIndexToPhysicalPoint((arr.shape[2] - 1, arr.shape[1] - 1, k)))
                expected = patient_coords(headers[match[0]], np.array([arr.shape[1] - 1]), np.array([arr.shape[2] - 1]))[0]
                assert np.allclose(end, expected, atol=1e-2)


def test_same_seed_same_study_new_seed_new_uids(tmp_path: Path) -> None:
    opts = PhantomOptions(contrasts=("T2",), max_matrix=256)
    a = generate_study(tmp_path / "a", 7, opts)
    b = generate_study(tmp_path / "b", 7, opts)
    c = generate_study(tmp_path / "c", 8, opts)
    assert a == b
    for fa, fb in zip(sorted((tmp_path / "a").rglob("*.dcm")), sorted((tmp_path / "b").rglob("*.dcm"))):
        assert fa.read_bytes() == fb.read_bytes()
    assert c["study_instance_uid"] != a["study_instance_uid"]
    assert c["series"][0]["series_instance_uid"] != a["series"][0]["series_instance_uid"]
    # the same seed as a T1 alone is other images: no UID of the T2 may come back
    t1 = generate_study(tmp_path / "t1", 7, replace(opts, contrasts=("T1",)))
    assert t1["series"][0]["series_instance_uid"] != a["series"][0]["series_instance_uid"]
    sops = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (tmp_path / "a").rglob("*.dcm")}
    assert not sops & {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (tmp_path / "t1").rglob("*.dcm")}
