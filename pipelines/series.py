"""Shared pre-processing: DICOM files -> sagittal MR series as volumes with their geometry, and the
choice of which series a spine pipeline reads (T2 sagittal first, then T1, then STIR)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from dicomnode.routing import orientation


class NoUsableSeries(ValueError):
    """None of the files is a sagittal MR series this pipeline can read; the message says why."""


@dataclass
class Series:
    datasets: list[pydicom.Dataset]  # sorted along the slice normal
    volume: np.ndarray  # float32 [slice, row, col], rescaled
    spacing: tuple[float, float]  # (between rows, between columns) in mm
    description: str
    weighting: str  # T2 | T1 | STIR | other

    @property
    def uids(self) -> list[str]:
        return [str(d.SOPInstanceUID) for d in self.datasets]

    @property
    def slice_spacing(self) -> float:
        """mm between neighbouring slice centres (along the normal, as the slices are sorted)."""
        ipp = np.asarray([d.ImagePositionPatient for d in self.datasets[:2]], dtype=float)
        return float(np.linalg.norm(ipp[1] - ipp[0]))

    def patient_points(self, k: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Patient coordinates (mm) of pixel centres (row, col) on slice k."""
        ds = self.datasets[k]
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
        return ipp + np.outer(np.asarray(cols) * self.spacing[1], iop[:3]) + np.outer(np.asarray(rows) * self.spacing[0], iop[3:])


def weighting(ds: pydicom.Dataset) -> str:
    """T2, T1 or STIR from the description, else from TR/TE/TI."""
    text = str(ds.get("SeriesDescription", "")).upper()
    for key, names in (("STIR", ("STIR", "TIRM")), ("T2", ("T2",)), ("T1", ("T1",))):
        if any(n in text for n in names):
            return key
    ti, te, tr = (float(ds.get(k) or 0) for k in ("InversionTime", "EchoTime", "RepetitionTime"))
    if ti > 0:
        return "STIR"
    if te >= 60:
        return "T2"
    if 0 < te < 30 and 0 < tr < 1200:
        return "T1"
    return "other"


PREFERENCE = {"T2": 0, "T1": 1, "STIR": 2, "other": 3}


def read_planes(files: list[Path]) -> dict[str, list[Series]]:
    """Every MR series among `files` (with pixel data) by plane (sagittal, axial, coronal), best
    weighting first; each file is read once."""
    groups: dict[tuple[str, str], list[pydicom.Dataset]] = defaultdict(list)
    for p in files:
        ds = pydicom.dcmread(p)
        plane = orientation(ds.get("ImageOrientationPatient"))
        if ds.get("Modality") == "MR" and "PixelData" in ds and plane is not None:
            groups[(plane, str(ds.SeriesInstanceUID))].append(ds)
    out: dict[str, list[Series]] = defaultdict(list)
    for (plane, _), items in groups.items():
        iop = np.asarray(items[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        items.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=float))))
        shapes = {(int(d.Rows), int(d.Columns)) for d in items}
        if len(shapes) != 1 or len(items) < 3:
            continue
        volume = np.stack([d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))
                           for d in items]).astype(np.float32)
        spacing = tuple(float(x) for x in items[0].PixelSpacing)
        out[plane].append(Series(items, volume, spacing, str(items[0].get("SeriesDescription", "")), weighting(items[0])))  # type: ignore[arg-type]
    for series in out.values():
        series.sort(key=lambda s: (PREFERENCE[s.weighting], -len(s.datasets)))
    return dict(out)


def read_series(files: list[Path], plane: str = "sagittal") -> list[Series]:
    """Every MR series in `plane` among `files`, best weighting first."""
    return read_planes(files).get(plane, [])


def sagittal_t2(sagittal: list[Series], reader: str) -> Series:
    """The best sagittal T2 among `sagittal`; otherwise a NoUsableSeries that says what there is."""
    for s in sagittal:
        if s.weighting == "T2":
            return s
    found = ", ".join(f"{s.weighting} '{s.description}'" for s in sagittal) or "no sagittal MR series"
    raise NoUsableSeries(f"{reader} reads a sagittal T2 series; the files hold {found}")


def pick_series(files: list[Path]) -> Series:
    series = read_series(files)
    if not series:
        raise NoUsableSeries("no sagittal MR series with at least 3 slices of one size among the files received")
    return series[0]
