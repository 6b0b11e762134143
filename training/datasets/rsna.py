"""The RSNA 2024 Lumbar Spine Degenerative Classification (LSDC) layout, read and written.

    <root>/train.csv                        study_id, then one column per condition and level
                                            (spinal_canal_stenosis_l1_l2 ...): Normal/Mild | Moderate | Severe
    <root>/train_series_descriptions.csv    study_id, series_id, series_description
                                            (Sagittal T1 | Sagittal T2/STIR | Axial T2)
    <root>/train_label_coordinates.csv      study_id, series_id, instance_number, condition, level, x, y
    <root>/train_images/<study_id>/<series_id>/<instance_number>.dcm

The real data set cannot be reached here; `write_fixture` writes phantom studies in exactly this
layout (grades from the phantom's truth, coordinates from its label volumes), so the reader and
whatever trains from it are exercised on the same files a user would bring.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.phantom.anatomy import LABEL_VALUES, LUMBAR_DISCS, LUMBAR_VERTEBRAE

CONDITIONS = ("spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_neural_foraminal_narrowing",
              "left_subarticular_stenosis", "right_subarticular_stenosis")
LEVELS = tuple(LUMBAR_DISCS)
SEVERITIES = {"Normal/Mild": "normal_mild", "Moderate": "moderate", "Severe": "severe"}  # file -> our grade names
DESCRIPTIONS = ("Sagittal T1", "Sagittal T2/STIR", "Axial T2")


def column(condition: str, level: str) -> str:
    """train.csv's column of a condition at a level: spinal_canal_stenosis_l1_l2."""
    return f"{condition}_{level.lower().replace('/', '_')}"


def condition_name(condition: str) -> str:
    """train_label_coordinates.csv's name of a condition: Spinal Canal Stenosis."""
    return condition.replace("_", " ").title()


@dataclass(frozen=True)
class Coordinate:
    series_id: int
    instance_number: int
    condition: str  # one of CONDITIONS
    level: str  # L1/L2 ...
    x: float  # column, pixels
    y: float  # row, pixels


@dataclass
class RsnaStudy:
    study_id: int
    root: Path
    grades: dict[tuple[str, str], str] = field(default_factory=dict)  # (condition, level) -> normal_mild | moderate | severe
    series: dict[int, str] = field(default_factory=dict)  # series_id -> description
    coordinates: list[Coordinate] = field(default_factory=list)

    def files(self, series_id: int) -> list[Path]:
        """The series' DICOM files in InstanceNumber order."""
        folder = self.root / "train_images" / str(self.study_id) / str(series_id)
        return sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))

    def series_ids(self, description: str) -> list[int]:
        return [k for k, v in self.series.items() if v == description]


def _rows(path: Path, required: list[str]) -> list[dict[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: not an RSNA 2024 LSDC folder")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: columns {missing} are missing")
        return list(reader)


def read_rsna(root: Path) -> list[RsnaStudy]:
    """Every study of an RSNA 2024 LSDC folder. An empty grade cell is a missing label (the real
    set has some) and stays absent; an unknown grade, condition or level is an error naming the row."""
    root = Path(root)
    studies: dict[int, RsnaStudy] = {}
    columns = {column(c, lv): (c, lv) for c in CONDITIONS for lv in LEVELS}
    for n, row in enumerate(_rows(root / "train.csv", ["study_id", *columns]), start=2):
        study = studies.setdefault(int(row["study_id"]), RsnaStudy(int(row["study_id"]), root))
        for name, key in columns.items():
            value = row[name].strip()
            if not value:
                continue
            if value not in SEVERITIES:
                raise ValueError(f"{root / 'train.csv'} line {n}: {name} is {value!r}, not one of {list(SEVERITIES)}")
            study.grades[key] = SEVERITIES[value]
    for row in _rows(root / "train_series_descriptions.csv", ["study_id", "series_id", "series_description"]):
        if int(row["study_id"]) in studies:
            studies[int(row["study_id"])].series[int(row["series_id"])] = row["series_description"]
    names = {condition_name(c): c for c in CONDITIONS}
    path = root / "train_label_coordinates.csv"
    for n, row in enumerate(_rows(path, ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]), start=2):
        if row["condition"] not in names or row["level"] not in LEVELS:
            raise ValueError(f"{path} line {n}: unknown condition {row['condition']!r} or level {row['level']!r}")
        if int(row["study_id"]) in studies:
            studies[int(row["study_id"])].coordinates.append(Coordinate(
                int(row["series_id"]), int(float(row["instance_number"])), names[row["condition"]], row["level"],
                float(row["x"]), float(row["y"])))
    return [studies[k] for k in sorted(studies)]


# --- the phantom in this layout ----------------------------------------------------------------

def _centroid(mask: np.ndarray) -> tuple[float, float] | None:
    rows, cols = np.nonzero(mask)
    return (float(cols.mean()), float(rows.mean())) if len(rows) else None


def _points(folder: Path, series_number: int) -> tuple[np.ndarray, list]:
    """(labels [slice, row, col] by InstanceNumber, datasets by InstanceNumber) of a phantom series."""
    import pydicom

    labels = np.load(folder / "truth" / f"series_{series_number}.npz")["labels"]
    files = sorted((folder / "dicom" / f"series_{series_number}").glob("*.dcm"))
    datasets = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in files), key=lambda d: int(d.InstanceNumber))
    return labels, datasets


def _patient_x(ds, col: float, row: float) -> float:
    """Patient x (LPS: + is the patient's left) of a pixel."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return float(ds.ImagePositionPatient[0]) + col * dc * iop[0] + row * dr * iop[3]


def _coordinates(folder: Path, series_ids: dict[str, int]) -> list[Coordinate]:
    """Where a reader would click: the canal at each disc on the mid-sagittal T2 slice; each neural
    foramen at each disc on the sagittal T1 slice that shows most of it; each subarticular recess
    (the canal's lateral edge) on the axial slice through each disc."""
    out: list[Coordinate] = []
    labels, datasets = _points(folder, 2)
    mid = int(np.argmax(np.isin(labels, [LABEL_VALUES[v] for v in LUMBAR_VERTEBRAE]).sum(axis=(1, 2))))
    for lv in LEVELS:
        disc = labels[mid] == LABEL_VALUES[lv]
        if disc.any():
            rows = np.nonzero(disc.any(axis=1))[0]
            canal = np.zeros_like(disc)
            canal[rows.min():rows.max() + 1] = labels[mid, rows.min():rows.max() + 1] == LABEL_VALUES["canal"]
            if (c := _centroid(canal)) is not None:
                out.append(Coordinate(series_ids["Sagittal T2/STIR"], mid + 1, "spinal_canal_stenosis", lv, *c))
    labels, datasets = _points(folder, 1)
    midline_x = _patient_x(datasets[len(datasets) // 2], labels.shape[2] / 2, labels.shape[1] / 2)
    for lv in LEVELS:
        best: dict[str, tuple[int, int, tuple[float, float]]] = {}
        for k in range(len(labels)):
            disc = labels[k] == LABEL_VALUES[lv]
            if not disc.any():
                continue
            rows = np.nonzero(disc.any(axis=1))[0]
            band = np.zeros_like(disc)
            band[max(rows.min() - 8, 0):rows.max() + 9] = True
            foramen = band & (labels[k] == LABEL_VALUES["neural_foramen"])
            if (c := _centroid(foramen)) is None:
                continue
            side = "left" if _patient_x(datasets[k], *c) > midline_x else "right"
            if foramen.sum() > best.get(side, (0, 0, c))[0]:
                best[side] = (int(foramen.sum()), k, c)
        for side, (_, k, c) in best.items():
            out.append(Coordinate(series_ids["Sagittal T1"], k + 1, f"{side}_neural_foraminal_narrowing", lv, *c))
    labels, datasets = _points(folder, 3)
    for i, lv in enumerate(LEVELS):  # three axial slices per disc, superior first: the middle one is on the disc
        k = 3 * i + 1
        rows, cols = np.nonzero(labels[k] == LABEL_VALUES["canal"])
        if not len(rows):
            continue
        xs = np.array([_patient_x(datasets[k], c, r) for r, c in zip(rows, cols)])
        for side, j in (("left", int(np.argmax(xs))), ("right", int(np.argmin(xs)))):
            out.append(Coordinate(series_ids["Axial T2"], k + 1, f"{side}_subarticular_stenosis", lv, float(cols[j]), float(rows[j])))
    return out


def write_fixture(root: Path, seeds: list[int], max_matrix: int = 256) -> Path:
    """Phantom studies (sagittal T1, sagittal T2, axial T2) in the RSNA 2024 LSDC layout; study_id is
    the seed, series_id seed * 10 + series number."""
    import pydicom

    from training.phantom.generator import PhantomOptions, generate_study

    root.mkdir(parents=True, exist_ok=True)
    grades, descriptions, coordinates = [], [], []
    back = {v: k for k, v in SEVERITIES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            folder = Path(tmp) / str(seed)
            generate_study(folder, seed, PhantomOptions(contrasts=("T1", "T2"), axial=True, max_matrix=max_matrix),
                           write_tissue=False)
            truth = json.loads((folder / "truth" / "truth.json").read_text())
            series_ids = dict(zip(DESCRIPTIONS, (seed * 10 + s["series_number"] for s in truth["series"])))
            for description, series_id in series_ids.items():
                descriptions.append({"study_id": seed, "series_id": series_id, "series_description": description})
                target = root / "train_images" / str(seed) / str(series_id)
                target.mkdir(parents=True, exist_ok=True)
                number = series_id - seed * 10
                for p in (folder / "dicom" / f"series_{number}").glob("*.dcm"):
                    shutil.copyfile(p, target / f"{int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber)}.dcm")
            grades.append({"study_id": seed, **{column(c, lv): back[truth["levels"][lv][c]] for c in CONDITIONS for lv in LEVELS}})
            coordinates += [{"study_id": seed, "series_id": c.series_id, "instance_number": c.instance_number,
                             "condition": condition_name(c.condition), "level": c.level, "x": round(c.x, 3), "y": round(c.y, 3)}
                            for c in _coordinates(folder, series_ids)]
    for name, rows in (("train.csv", grades), ("train_series_descriptions.csv", descriptions),
                       ("train_label_coordinates.csv", coordinates)):
        with (root / name).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return root
