"""PNG previews of a study folder (`dicom/` + `truth/`): what a person looks at first."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402

from training.phantom.anatomy import LABEL_VALUES  # noqa: E402


def read_series(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Pixel volume [slice, row, col] in ascending InstanceNumber, with rescale applied."""
    headers = sorted((pydicom.dcmread(p) for p in Path(folder).glob("*.dcm")), key=lambda d: int(d.InstanceNumber))
    vol = np.stack([d.pixel_array * float(getattr(d, "RescaleSlope", 1)) + float(getattr(d, "RescaleIntercept", 0))
                    for d in headers])
    return vol.astype(np.float32), headers


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def mid_sagittal(study: Path, series: dict) -> tuple[np.ndarray, np.ndarray]:
    """The slice nearest to the spine's midline (most vertebral body voxels) and its labels."""
    vol, _ = read_series(study / "dicom" / f"series_{series.get('series_number', 1)}")
    labels = np.load(study / "truth" / series["labels_file"])["labels"]
    bodies = np.isin(labels, [LABEL_VALUES[k] for k in ("L1", "L2", "L3", "L4", "L5", "S1")])
    k = int(np.argmax(bodies.sum(axis=(1, 2)))) if bodies.any() else len(vol) // 2
    return vol[k], labels[k]


def study_preview(study: Path, out_png: Path) -> Path:
    """Mid-sagittal slice of every sagittal series, the last one again with label outlines."""
    study = Path(study)
    truth = json.loads((study / "truth" / "truth.json").read_text())
    sag = [s for s in truth["series"] if s["description"].startswith("SAG")]
    fig, axes = plt.subplots(1, len(sag) + 1, figsize=(4 * (len(sag) + 1), 4.6))
    for ax, s in zip(axes, sag):
        img, _ = mid_sagittal(study, s)
        ax.imshow(_window(img), cmap="gray")
        ax.set_title(s["description"])
    img, lab = mid_sagittal(study, sag[0])
    axes[-1].imshow(_window(img), cmap="gray")
    axes[-1].contour(np.isin(lab, range(1, 7)), levels=[0.5], colors="yellow", linewidths=0.6)
    axes[-1].contour(np.isin(lab, range(11, 16)), levels=[0.5], colors="cyan", linewidths=0.6)
    axes[-1].contour(lab == LABEL_VALUES["canal"], levels=[0.5], colors="magenta", linewidths=0.6)
    ang = truth.get("lordosis_deg", {})
    axes[-1].set_title(f"truth: {truth.get('study_class', '')}, L1-S1 {ang.get('L1-S1', float('nan')):.1f} deg")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
