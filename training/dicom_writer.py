"""Writes a magnitude volume as an MR Image Storage series that passes dciodvfy.

Shared by the phantom and by the converter for real cases, so both travel the same DICOM path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from training.phantom.geometry import SlicePlane

IMPLEMENTATION_UID = "1.2.826.0.1.3680043.10.1524.1"  # pydicom's root + our suffix
SOFTWARE = "dicomnode phantom 0.1"


def uid(*parts: object) -> str:
    """A deterministic UID in the 2.25 (UUID-derived) form: same parts, same UID."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@dataclass(frozen=True)
class StudyInfo:
    study_instance_uid: str
    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    description: str = "MR LUMBAR SPINE"
    frame_of_reference_uid: str = ""


@dataclass(frozen=True)
class SeriesInfo:
    series_instance_uid: str
    series_number: int
    description: str
    contrast: str  # T1 | T2 | STIR | other
    tr: float | None = None
    te: float | None = None
    ti: float | None = None
    field_t: float = 1.5
    bits_stored: int = 16
    rescale: tuple[float, float] | None = None  # (slope, intercept) or none
    slice_spacing: float | None = None  # centre to centre; thickness plus gap


def _ds_number(v: float) -> str:
    return f"{v:.6g}"


def write_mr_series(out_dir: Path, pixels: np.ndarray, planes: list[SlicePlane], study: StudyInfo,
                    series: SeriesInfo) -> list[Path]:
    """One file per slice, InstanceNumber 1..N in the order of `planes`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if pixels.dtype != np.uint16 or pixels.shape[0] != len(planes):
        raise ValueError("pixels must be uint16 with one slice per plane")
    paths = []
    for k, (plane, frame) in enumerate(zip(planes, pixels)):
        sop_uid = uid(series.series_instance_uid, "instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        meta.ImplementationVersionName = "DICOMNODE01"
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study.study_time
        ds.AccessionNumber = study.accession_number
        ds.Modality = "MR"
        ds.Manufacturer = "dicomnode"
        ds.ManufacturerModelName = "lumbar phantom"
        ds.SoftwareVersions = SOFTWARE
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study.description
        ds.SeriesDescription = series.description
        ds.PatientName = study.patient_name
        ds.PatientID = study.patient_id
        ds.PatientBirthDate = study.patient_birth_date
        ds.PatientSex = study.patient_sex
        ds.BodyPartExamined = "LSPINE"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study.study_instance_uid
        ds.SeriesInstanceUID = series.series_instance_uid
        ds.StudyID = study.study_id
        ds.SeriesNumber = series.series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = study.frame_of_reference_uid or uid(study.study_instance_uid, "for")
        ds.PositionReferenceIndicator = ""
        _mr_acquisition(ds, series, plane)
        ds.ImagePositionPatient = [_ds_number(v) for v in plane.position]
        ds.ImageOrientationPatient = [_ds_number(v) for v in (*plane.row_cosine, *plane.col_cosine)]
        ds.PixelSpacing = [_ds_number(plane.pixel_spacing[0]), _ds_number(plane.pixel_spacing[1])]
        ds.SliceThickness = _ds_number(plane.thickness)
        ds.SliceLocation = _ds_number(float(np.dot(plane.position, plane.normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = frame.shape
        ds.BitsAllocated = 16
        ds.BitsStored = series.bits_stored
        ds.HighBit = series.bits_stored - 1
        ds.PixelRepresentation = 0
        if series.rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = (_ds_number(v) for v in series.rescale)
            ds.RescaleType = "US"
        lo, hi = int(frame.min()), int(frame.max())
        center, width = (lo + hi) / 2, max(hi - lo, 1)
        ds.WindowCenter, ds.WindowWidth = _ds_number(center), _ds_number(width)
        ds.PixelData = np.ascontiguousarray(frame).tobytes()
        path = out_dir / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _mr_acquisition(ds: pydicom.Dataset, s: SeriesInfo, plane: SlicePlane) -> None:
    """MR Image module: sequence attributes that match the contrast."""
    ds.ScanningSequence = ["SE", "IR"] if s.ti else ["SE"]
    ds.SequenceVariant = ["SK"]
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = {"T1": "tse_T1", "T2": "tse_T2", "STIR": "tir_STIR"}.get(s.contrast, "unknown")
    ds.AngioFlag = "N"
    ds.RepetitionTime = _ds_number(s.tr) if s.tr else None  # type 2: empty when unknown
    ds.EchoTime = _ds_number(s.te) if s.te else None
    if s.ti:
        ds.InversionTime = _ds_number(s.ti)
    ds.EchoTrainLength = 1 if s.contrast == "T1" else 16
    ds.NumberOfAverages = 1
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds_number(s.field_t)
    ds.SpacingBetweenSlices = _ds_number(s.slice_spacing or plane.thickness)
