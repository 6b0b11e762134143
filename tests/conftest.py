"""Shared fixtures: studies generated once per session, and helpers to read them back."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.phantom.generator import PhantomOptions, generate_study

# Seeds and options that together cover every contrast, the axial series, every study class and
# both bit depths; small matrices keep the suite fast, one study keeps the full range.
STUDY_CASES = [
    (101, PhantomOptions(axial=True, max_matrix=640)),
    (102, PhantomOptions(contrasts=("T2", "T1"), study_class="herniated_disc", max_matrix=384)),
    (103, PhantomOptions(contrasts=("STIR",), axial=True, study_class="spinal_stenosis", max_matrix=320)),
    (104, PhantomOptions(contrasts=("T1", "T2"), study_class="spondylosis", lordosis_deg=15, max_matrix=384)),
    (105, PhantomOptions(contrasts=("T2",), study_class="healthy", lordosis_deg=78, max_matrix=320)),
    (106, PhantomOptions(contrasts=("T2", "STIR"), axial=True, max_matrix=384)),
]


@pytest.fixture(scope="session")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("phantom")
    out = []
    for seed, opts in STUDY_CASES:
        generate_study(root / f"s{seed}", seed, opts)
        out.append(root / f"s{seed}")
    return out


def load_truth(study: Path) -> dict:
    return json.loads((study / "truth" / "truth.json").read_text())


def read_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Stored pixel values [slice, row, col] in ascending InstanceNumber, with the headers."""
    headers = sorted((pydicom.dcmread(p) for p in folder.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))
    return np.stack([d.pixel_array for d in headers]), headers


def patient_coords(ds: pydicom.Dataset, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Patient (LPS) coordinates of pixel centres, from the header alone."""
    ipp = np.array(ds.ImagePositionPatient, dtype=float)
    iop = np.array(ds.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return ipp + np.outer(cols * dc, iop[:3]) + np.outer(rows * dr, iop[3:])


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy is not installed (apt package dicom3tools); run scripts/setup.sh")
    r = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
