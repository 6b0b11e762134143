"""Phantom series rendered in memory (no DICOM written): what the trainers learn from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from training.phantom.generator import PhantomOptions, StudyDesign


@dataclass
class RenderedSeries:
    design: StudyDesign
    contrast: str  # T2 | T1 | STIR
    pixels: np.ndarray  # float32 [slice, row, col] as the scanner would store them
    labels: np.ndarray  # uint8 phantom label values, same shape
    spacing: tuple[float, float]  # (between rows, between columns) in mm
    slice_spacing: float  # mm between neighbouring slice centres


def phantom_series(seed: int, options: PhantomOptions) -> Iterator[RenderedSeries]:
    """Every sagittal series of one phantom study, with its exact labels."""
    from training.phantom.acquisition import acquisitions
    from training.phantom.generator import design_study
    from training.phantom.mr import degrade, quantise, signal_table
    from training.phantom.render import render_series

    d = design_study(seed, options)
    for a in acquisitions(d, options):
        signals = signal_table(d.tissues.names, a.contrast, d.nucleus_t2)
        labels, _, clean = render_series(d.shapes, a.planes, signals)
        ref = float(signals[1:].max())
        pixels = quantise(degrade(clean, a.degradation, ref), a.degradation, ref).astype(np.float32)
        between = float(np.linalg.norm(a.planes[1].position - a.planes[0].position)) if len(a.planes) > 1 else 1.0
        yield RenderedSeries(d, a.contrast.name, pixels, labels, tuple(a.planes[0].pixel_spacing), between)
