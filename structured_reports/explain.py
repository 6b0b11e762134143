"""Explanation maps (Grad-CAM) of a decision on one source image: a Parametric Map by default, or a
colour Secondary Capture overlay for viewers that cannot show Parametric Maps. Both reference
the source image and say which decision they explain."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from matplotlib import colormaps
from pydicom import Dataset

from structured_reports import codes
from structured_reports.common import check_sources, equipment, new_series
from structured_reports.model import Algorithm


def _check(source: Dataset, heatmap: np.ndarray) -> np.ndarray:
    check_sources([source])
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"the map has shape {heat.shape}; its source image is {source.Rows}x{source.Columns}")
    if not np.isfinite(heat).all() or heat.min() < 0 or heat.max() > 1:
        raise ValueError("a Grad-CAM map must hold finite values in [0, 1]")
    return heat


def _reference(ds: Dataset, source: Dataset, decision: str) -> None:
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceImageSequence = [ref]
    ds.DerivationDescription = f"Grad-CAM of: {decision}"[:1024]
    # Laterality is type 2C: absent for an unpaired body part, which validators learn from BodyPartExamined.
    ds.BodyPartExamined = source.get("BodyPartExamined", "LSPINE")
    if "Laterality" in source:
        ds.Laterality = source.Laterality


def build_gradcam_map(source: Dataset, heatmap: np.ndarray, algorithm: Algorithm, decision: str) -> hd.pm.ParametricMap:
    """A one-frame float Parametric Map on the source image's plane, values 0-1 (Grad-CAM, DCM 130403)."""
    heat = _check(source, heatmap)
    mapping = hd.pm.RealWorldValueMapping(lut_label="GRADCAM", lut_explanation=decision[:64], unit=codes.NO_UNITS,
                                          value_range=(0.0, 1.0), slope=1.0, intercept=0.0,
                                          quantity_definition=codes.GRADCAM)
    pm = hd.pm.ParametricMap(
        source_images=[source], pixel_array=heat[np.newaxis], **new_series("gradcam"), **equipment(algorithm),
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)], content_label="GRADCAM",
        content_description=decision[:64], content_creator_name="dicomnode^AI")
    _reference(pm, source, decision)
    return pm


def _letters(v: np.ndarray) -> str:
    """DICOM Patient Orientation letters of a direction (+x L, +y P, +z H), strongest first."""
    names = (("R", "L"), ("A", "P"), ("F", "H"))
    order = np.argsort(-np.abs(v))
    return "".join(names[i][int(v[i] > 0)] for i in order if abs(v[i]) > 0.25) or "L"


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, threshold: float = 0.2) -> np.ndarray:
    """The grey image (1st-99th percentile window) with the map in 'jet' where it exceeds `threshold`."""
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    colour = colormaps["jet"](heatmap)[..., :3]
    alpha = np.where(heatmap > threshold, 0.45, 0.0)[..., None]
    return np.round(255 * ((1 - alpha) * rgb + alpha * colour)).astype(np.uint8)


def build_gradcam_overlay(source: Dataset, heatmap: np.ndarray, algorithm: Algorithm, decision: str) -> hd.sc.SCImage:
    """A colour Secondary Capture: the source slice with the map blended in, for any viewer."""
    heat = _check(source, heatmap)
    iop = np.asarray(source.ImageOrientationPatient, dtype=float)
    kw = equipment(algorithm)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=overlay_rgb(source.pixel_array, heat), photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", **new_series("gradcam-overlay"), manufacturer=kw["manufacturer"],
        pixel_spacing=tuple(float(x) for x in source.PixelSpacing), patient_orientation=(_letters(iop[:3]), _letters(iop[3:])),
        manufacturer_model_name=kw["manufacturer_model_name"], software_versions=kw["software_versions"])
    _reference(sc, source, decision)
    return sc
