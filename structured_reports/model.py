"""Plain typed inputs of our result objects. Pipelines fill these; the builders turn them into
DICOM; the readers turn DICOM back into them. Image coordinates are (column, row) in pixels of the
named source image, as DICOM SCOORD has them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.sr.coding import Code

from dicomnode.config import LORDOSIS_THRESHOLDS_DEG
from structured_reports.codes import ARTIFICIAL_INTELLIGENCE

Point = tuple[float, float]


@dataclass(frozen=True)
class Algorithm:
    """What made a result; written as Algorithm Identification (TID 4019) and into the SEG segments."""

    name: str
    version: str
    family: Code = ARTIFICIAL_INTELLIGENCE


@dataclass(frozen=True)
class Segment:
    """One structure at one level: `structure` is a key of `codes.STRUCTURES` ("L4", "L4/L5", "canal").
    `mask` has one 2-D frame per source image, in the order of the source list: bool, or float
    probabilities in [0, 1] for a fractional SEG."""

    structure: str
    mask: np.ndarray


@dataclass(frozen=True)
class Region:
    """An image region on one source image: a POINT (one point) or a closed POLYLINE."""

    sop_instance_uid: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Finding:
    """A per-level finding: `kind` is a key of `codes.FINDINGS`, `grade` of `codes.GRADES`."""

    kind: str
    level: str
    probability: float
    grade: str | None = None
    region: Region | None = None
    segment: str | None = None  # a SEG structure the finding refers to (volumetric findings)


@dataclass(frozen=True)
class Line:
    start: Point
    end: Point


@dataclass(frozen=True)
class Angle:
    """A lordosis angle between two endplate lines drawn on one source slice (`span` "L1-S1" or "L1-L5")."""

    span: str
    degrees: float
    sop_instance_uid: str
    lines: tuple[Line, Line]
    category: str | None = None  # L1-S1 only: a key of codes.GRADES (hypolordosis, normal_lordosis, hyperlordosis)
    # the angle's interquartile range over the slices it is the median of (None: fewer than three slices)
    spread_deg: float | None = None
    uncertain: bool = False  # the lines need a look (spread, doubtful naming: the pipeline decides; the SR says so)


@dataclass(frozen=True)
class Explanation:
    """A Grad-CAM map (values in [0, 1], the source image's size) of one decision on one source image."""

    sop_instance_uid: str
    heatmap: np.ndarray
    decision: str


@dataclass(frozen=True)
class ResultOptions:
    """How results are encoded and graded, from the node configuration's `results:` section (viewers
    and sites differ)."""

    seg_fractional: bool = False
    seg_omit_empty_frames: bool = True
    explanations: str = "parametric_map"  # or "secondary_capture": a colour overlay any viewer shows
    lordosis_thresholds_deg: tuple[float, float] = LORDOSIS_THRESHOLDS_DEG


@dataclass
class Report:
    """What the SR carries: findings and angles; the reader gives this back."""

    findings: list[Finding] = field(default_factory=list)
    angles: list[Angle] = field(default_factory=list)
    unmeasured: list[str] = field(default_factory=list)  # lordosis spans attempted and not measured
