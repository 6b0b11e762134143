"""PNG previews of results, for the README, the web page and reviewing a run: a source slice with
the SEG outlines, the endplate lines and the lordosis angles; a Grad-CAM overlay."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from pydicom import Dataset  # noqa: E402

from structured_reports.codes import STRUCTURES  # noqa: E402
from structured_reports.explain import overlay_rgb  # noqa: E402
from structured_reports.model import Angle, Report, Segment  # noqa: E402


def _pixels(ds: Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def render_slice(sources: Sequence[Dataset], index: int, segments: Sequence[Segment], angles: Sequence[Angle],
                 out: Path, title: str = "") -> Path:
    """Slice `index` of `sources` with each segment's outline in its display colour and, where the
    angles were measured on this slice, their endplate lines and values."""
    ds = sources[index]
    img = _pixels(ds)
    lo, hi = np.percentile(img, [1, 99.5])
    fig, ax = plt.subplots(figsize=(6, 6 * img.shape[0] / img.shape[1]), dpi=110)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    for s in segments:
        frame = np.asarray(s.mask[index], dtype=float)
        if frame.max() > 0:
            rgb = np.array(STRUCTURES[s.structure][2]) / 255 if s.structure in STRUCTURES else (1, 1, 0)
            ax.contour(frame, levels=[0.5], colors=[rgb], linewidths=0.9)
    y_text = 0.04
    for a in angles:
        if a.sop_instance_uid != str(ds.SOPInstanceUID):
            continue
        colour = "#ff5050" if a.span == "L1-S1" else "#ffd24d"
        for ln in a.lines:  # SCOORD (0,0) is a pixel corner; imshow puts pixel centres on integers
            ax.plot([ln.start[0] - 0.5, ln.end[0] - 0.5], [ln.start[1] - 0.5, ln.end[1] - 0.5], color=colour, lw=1.6)
        ax.text(0.02, y_text, f"lordosis {a.span}: {a.degrees:.1f}°" + (f" ({a.category})" if a.category else "")
                + (", uncertain" if a.uncertain else ""),
                color=colour, transform=ax.transAxes, fontsize=9, bbox={"facecolor": "black", "alpha": 0.6, "lw": 0})
        y_text += 0.06
    return _save(fig, ax, out, title)


def seg_source_uids(seg: Dataset) -> set[str]:
    """SOP Instance UIDs of the images a SEG was derived from."""
    return {str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in seg.PerFrameFunctionalGroupsSequence}


def slice_position(ds: Dataset) -> float:
    """Position of a slice along its normal, for ordering a series."""
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    return float(np.dot(np.cross(iop[:3], iop[3:]), np.asarray(ds.ImagePositionPatient, dtype=float)))


def render_result(seg: Dataset, sr: Dataset | None, sources: Sequence[Dataset], out: Path, title: str = ""
                  ) -> tuple[Path, list[Segment], Report | None]:
    """What the SEG (and the SR, if given) say, drawn on the slice the angles were measured on (else
    the middle one); returns the PNG, the segments and the report read back from the objects."""
    from structured_reports.reader import read_seg, read_sr

    sources = sorted(sources, key=slice_position)
    segments, report = read_seg(seg, sources), read_sr(sr) if sr is not None else None
    angles = report.angles if report else []
    uids = [str(d.SOPInstanceUID) for d in sources]
    measured = [a.sop_instance_uid for a in angles if a.sop_instance_uid in uids]
    k = uids.index(measured[0]) if measured else len(sources) // 2
    return render_slice(sources, k, segments, angles, out, title), segments, report


def render_gradcam(source: Dataset, heatmap: np.ndarray, out: Path, title: str = "") -> Path:
    fig, ax = plt.subplots(figsize=(5, 5 * int(source.Rows) / int(source.Columns)), dpi=110)
    ax.imshow(overlay_rgb(_pixels(source), heatmap))
    return _save(fig, ax, out, title)


def _save(fig: plt.Figure, ax: plt.Axes, out: Path, title: str) -> Path:
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
