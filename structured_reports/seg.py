"""DICOM SEG of the spine: one segment per structure and level, SNOMED CT coded, coloured, with
the algorithm named; highdicom places each frame on its source image's plane."""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom import Dataset

from structured_reports.codes import ANATOMICAL_STRUCTURE, STRUCTURES
from structured_reports.common import algorithm_identification, check_sources, equipment, new_series
from structured_reports.model import Algorithm, Segment


def segment_description(number: int, structure: str, algorithm: Algorithm) -> hd.seg.SegmentDescription:
    if structure not in STRUCTURES:
        raise KeyError(f"unknown structure {structure!r}; known: {', '.join(STRUCTURES)}")
    code, label, rgb = STRUCTURES[structure]
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=label, segmented_property_category=ANATOMICAL_STRUCTURE,
        segmented_property_type=code, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(algorithm), tracking_id=label,
        tracking_uid=hd.UID(), display_color=hd.color.CIELabColor.from_rgb(*rgb))


def build_seg(sources: Sequence[Dataset], segments: Sequence[Segment], algorithm: Algorithm, *,
              fractional: bool = False, omit_empty_frames: bool = True) -> hd.seg.Segmentation:
    """A SEG over `sources` (masks have one frame per source, in that order). Binary by default;
    `fractional` keeps probabilities; `omit_empty_frames=False` keeps empty frames for viewers that
    expect one frame per source image and segment."""
    check_sources(sources)
    if not segments:
        raise ValueError("a SEG needs at least one segment")
    shape = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    for s in segments:
        if s.mask.shape != shape:
            raise ValueError(f"mask of {s.structure} has shape {s.mask.shape}; the source images give {shape}")
    if len({s.structure for s in segments}) != len(segments):
        raise ValueError("each structure may appear once in a SEG")
    stack = np.stack([s.mask for s in segments], axis=-1)
    if fractional:
        pixels = np.clip(stack.astype(np.float32), 0.0, 1.0)
        kind = hd.seg.SegmentationTypeValues.FRACTIONAL
    else:
        pixels = stack.astype(bool) if stack.dtype == bool else stack >= 0.5
        kind = hd.seg.SegmentationTypeValues.BINARY
    seg = hd.seg.Segmentation(
        source_images=list(sources), pixel_array=pixels, segmentation_type=kind,
        segment_descriptions=[segment_description(i + 1, s.structure, algorithm) for i, s in enumerate(segments)],
        **new_series("seg"), **equipment(algorithm), fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        content_label="SPINE", content_description="Lumbar spine segmentation", content_creator_name="dicomnode^AI",
        omit_empty_frames=omit_empty_frames)
    return seg
