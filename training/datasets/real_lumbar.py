"""The real sagittal lumbar MRI cases in `shared/data/real_lumbar/` (partial labels).

Each case labels only one kind of structure (vertebral bodies or discs). Everything else in the
image is *unlabelled*, not background: `RealCase.known` says which voxels a loss may use.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.dicom_writer import SeriesInfo, StudyInfo, uid, write_mr_series
from training.phantom.anatomy import LABEL_VALUES
from training.phantom.geometry import SlicePlane

DEFAULT_DIR = Path(os.environ.get("DICOMNODE_REAL_DIR",
                                  Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real_lumbar"))
UNNAMED_BASE = 100  # "levelK_from_top" -> 100 + K: a vertebral body whose level is unknown


@dataclass(frozen=True)
class RealCase:
    case_id: str
    dataset: str  # VB1 | VB3 | IVD
    image: np.ndarray  # [SI, AP, LR], as stored
    labels: np.ndarray  # 0 background, 1..N one structure each, ordered superior to inferior
    names: tuple[str, ...]  # level name of label 1..N
    kind: str  # vertebral_body | disc
    spacing_mm: tuple[float, float, float]  # SI, AP, LR
    sequence: str

    def label_values(self) -> dict[str, int]:
        """Our label value for each structure, as the phantom uses them (L1 -> 1, L4/L5 -> 14)."""
        return {n: LABEL_VALUES.get(n, UNNAMED_BASE + i + 1) for i, n in enumerate(self.names)}

    def relabelled(self) -> np.ndarray:
        """`labels` in our label values."""
        lut = np.zeros(len(self.names) + 1, dtype=np.uint8)
        for i, v in enumerate(self.label_values().values()):
            lut[i + 1] = v
        return lut[self.labels]

    def known(self) -> np.ndarray:
        """Voxels whose class is known: the labelled structures, and background far enough from
        every unlabelled structure to be safe. Here: labelled voxels plus voxels outside the
        band of slices and rows that the labelled structures span, which holds no spine."""
        known = self.labels > 0
        cols = np.nonzero(known.any(axis=(0, 2)))[0]
        band = np.zeros_like(known)
        band[:, max(cols.min() - 15, 0):cols.max() + 40, :] = True  # spine, canal and arches lie here
        return known | ~band


def case_paths(root: Path = DEFAULT_DIR) -> list[Path]:
    """Every case file in `root`; none at all is an error, not an empty training or test set."""
    paths = sorted(Path(root).glob("*.npz"))
    if not paths:
        raise FileNotFoundError(f"no real cases (*.npz) in {root}: put ../shared/data/real_lumbar beside the "
                                f"clone, or point DICOMNODE_REAL_DIR (or --real-dir) at it")
    return paths


def load_case(path: Path) -> RealCase:
    with np.load(path) as z:
        names = tuple(str(n) for n in z["names"])
        sp = tuple(float(s) for s in z["spacing_mm"])
        spacing = (sp[0], sp[0], sp[1]) if len(sp) == 2 else sp  # stored as [in-plane, slice] or 3 values
        case_id = Path(path).stem
        return RealCase(case_id, case_id.split("_")[0], z["image"], z["labels"], names, str(z["kind"]),
                        spacing, str(z["sequence"]))


def load_cases(root: Path = DEFAULT_DIR) -> list[RealCase]:
    return [load_case(p) for p in case_paths(root)]


def case_to_dicom(case: RealCase, out: Path) -> dict:
    """Write a case as one sagittal MR series (real pixels) with a truth folder like the phantom's.

    Orientation [0,1,0,0,0,-1]: columns run posterior, rows inferior, as the arrays are stored;
    slice k lies 2 mm further to the patient's right than slice k-1.
    """
    out = Path(out)
    si, ap, lr = case.spacing_mm
    n_rows, n_cols, n_slices = case.image.shape
    row_cos, col_cos = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
    planes = [SlicePlane(np.array([-(k - (n_slices - 1) / 2) * lr, -ap * (n_cols - 1) / 2, si * (n_rows - 1) / 2]),
                         row_cos, col_cos, (si, ap), n_rows, n_cols, lr) for k in range(n_slices)]
    pixels = np.ascontiguousarray(np.moveaxis(case.image, 2, 0)).astype(np.uint16)
    study_uid = uid("dicomnode-real", case.case_id, "study")
    info = StudyInfo(study_uid, f"REAL^{case.case_id}", case.case_id, "", "O", "20240101", "120000",
                     case.case_id.replace("_", ""), "1", "MR LUMBAR SPINE (research case)",
                     uid("dicomnode-real", case.case_id, "frame"))
    series = SeriesInfo(uid("dicomnode-real", case.case_id, "series"), 1, f"SAG {case.sequence}"[:64], "other",
                        bits_stored=16, slice_spacing=lr)
    write_mr_series(out / "dicom" / "series_1", pixels, planes, info, series)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "truth" / "series_1.npz", labels=np.moveaxis(case.relabelled(), 2, 0),
                        known=np.moveaxis(case.known(), 2, 0))
    truth = {"source": "real_lumbar", "case": case.case_id, "dataset": case.dataset, "kind": case.kind,
             "study_instance_uid": study_uid, "levels": {n: {} for n in case.names},
             "partial_labels": f"only {case.kind} voxels are labelled; 'known' marks where 0 means background",
             "series": [{"series_instance_uid": series.series_instance_uid, "description": series.description,
                         "labels_file": "series_1.npz", "label_values": case.label_values()}]}
    (out / "truth" / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def split(case_ids: list[str], fold: int | str, folds: int = 3) -> tuple[list[str], list[str]]:
    """(train, held-out) case ids of one cross-validation fold, stratified by dataset: every
    `folds`-th case of each dataset (in id order) is held out, so each fold sees every scanner type.
    A dataset's name as `fold` holds out that whole dataset: scanners and a site never seen."""
    by_dataset = {d: sorted(c for c in case_ids if c.split("_")[0] == d) for d in sorted({c.split("_")[0] for c in case_ids})}
    if isinstance(fold, str) and fold not in by_dataset:
        raise ValueError(f"no real cases of dataset {fold!r} to hold out; the datasets here are {', '.join(by_dataset)}")
    held = by_dataset[fold] if isinstance(fold, str) else [c for ids in by_dataset.values() for c in ids[fold::folds]]
    return [c for c in sorted(case_ids) if c not in held], sorted(held)
