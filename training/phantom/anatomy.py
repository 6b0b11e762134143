"""Analytic 3-D lumbar spine: shapes in patient space that any slice grid can sample exactly.

The spine is a chain of vertebral bodies and discs in the mid-sagittal plane (x = 0). Each element
lies between two endplate planes, so the lordosis angle is known exactly by construction: it is the
difference of the endplate angles, not something measured afterwards. Every other structure (canal,
posterior elements, foramina, muscle, fat) is placed relative to that chain, and every pathology is
a change of a shape, so the label volume and the image are sampled from the same geometry.

Endplate angle convention: an endplate with angle t runs along (0, cos t, sin t) in (x, y, z), its
posterior end higher for positive t; the normal (0, -sin t, cos t) points superior.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

VERTEBRAE = ["T12", "L1", "L2", "L3", "L4", "L5", "S1"]
DISCS = ["T12/L1", "L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"]
LUMBAR_VERTEBRAE = ["L1", "L2", "L3", "L4", "L5", "S1"]
LUMBAR_DISCS = DISCS[1:]

LABEL_VALUES: dict[str, int] = {
    "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "S1": 6, "T12": 7, "sacrum": 8,
    "L1/L2": 11, "L2/L3": 12, "L3/L4": 13, "L4/L5": 14, "L5/S1": 15, "T12/L1": 16,
    "posterior_elements": 20, "canal": 30, "nerve_root": 32, "neural_foramen": 33,
    "ligamentum_flavum": 34, "paraspinal_muscle": 40, "subcutaneous_fat": 41, "body": 42,
}

# Tissue classes for the MR signal model; pathologies add their own entries per study.
BASE_TISSUES = ["air", "fat", "muscle", "soft_tissue", "cortical_bone", "marrow", "annulus",
                "nucleus", "csf", "nerve", "ligament", "posterior_bone", "viscera"]


def _dir(t: float) -> np.ndarray:
    return np.array([np.cos(t), np.sin(t)])


def _normal(t: float) -> np.ndarray:
    return np.array([-np.sin(t), np.cos(t)])


@dataclass
class Element:
    """A vertebral body or disc between a bottom and a top endplate, in the (y, z) plane."""

    name: str
    bottom: np.ndarray  # centre of the bottom endplate (y, z)
    bottom_angle: float  # radians
    top: np.ndarray
    top_angle: float
    depth: float  # antero-posterior size of the endplate, mm
    width: float  # left-right size, mm

    @property
    def mid(self) -> np.ndarray:
        return (self.bottom + self.top) / 2

    @property
    def mid_angle(self) -> float:
        return (self.bottom_angle + self.top_angle) / 2

    @property
    def height(self) -> float:
        return float(np.linalg.norm(self.top - self.bottom))

    def local(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, u, w, below-top, above-bottom) for points p (N, 3): u antero-posterior, w along the axis."""
        yz = p[..., 1:3]
        e, n = _dir(self.mid_angle), _normal(self.mid_angle)
        rel = yz - self.mid
        u = rel @ e
        w = rel @ n
        above_bottom = (yz - self.bottom) @ _normal(self.bottom_angle)
        below_top = -((yz - self.top) @ _normal(self.top_angle))
        return p[..., 0], u, w, below_top, above_bottom

    def endplate_points(self, which: str) -> np.ndarray:
        """Anterior and posterior ends of an endplate as 3-D patient points (x = 0)."""
        c, t = (self.top, self.top_angle) if which == "superior" else (self.bottom, self.bottom_angle)
        a, b = c - self.depth / 2 * _dir(t), c + self.depth / 2 * _dir(t)
        return np.array([[0.0, a[0], a[1]], [0.0, b[0], b[1]]])

    def to_patient(self, x: float, u: float, w: float) -> np.ndarray:
        yz = self.mid + u * _dir(self.mid_angle) + w * _normal(self.mid_angle)
        return np.array([x, yz[0], yz[1]])


@dataclass
class Shape:
    """A structure that paints a label and tissues where `inside` holds.

    `paint(p)` returns (mask, tissue) for points p (..., 3): tissue is an int array of the mask's
    shape or a single int. `lo`/`hi` bound the shape in patient space so that painting touches only
    the pixels that can be inside.
    """

    name: str
    label: int
    lo: np.ndarray
    hi: np.ndarray
    paint: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | int]]


def element_box(el: Element, u0: float, u1: float, w0: float, w1: float,
                x0: float, x1: float) -> tuple[np.ndarray, np.ndarray]:
    """Patient-space bounding box of the region u0..u1, w0..w1, x0..x1 of an element's frame."""
    c = np.array([el.to_patient(0.0, u, w) for u in (u0, u1) for w in (w0, w1)])
    lo, hi = c.min(axis=0) - 2.0, c.max(axis=0) + 2.0
    lo[0], hi[0] = x0 - 1.0, x1 + 1.0
    return lo, hi


def superellipse(u: np.ndarray, x: np.ndarray, ru: float, rx: float, k: float = 2.5) -> np.ndarray:
    return np.abs(u / ru) ** k + (x / rx) ** 2


@dataclass
class SpineParams:
    """Everything that fixes one study's anatomy; sampled by `sample_anatomy`."""

    lordosis_deg: float
    sacral_slope_deg: float
    size: float
    body_heights: dict[str, float]
    body_depths: dict[str, float]
    body_widths: dict[str, float]
    disc_heights: dict[str, float]
    wedges_deg: dict[str, float]  # per disc and body: top angle = bottom angle - wedge
    canal_ap_radius: float
    canal_lr_radius: float
    canal_gap: float
    cortex: float
    fat_thickness: float
    body_lr: float
    body_ap: float
    slips_mm: dict[str, float] = field(default_factory=dict)  # anterior slip of the upper vertebra per disc
    s1_s2_remnant_mm: float = 0.0  # thickness of a rudimentary S1/S2 disc inside the sacrum; 0: none


def sample_anatomy(rng: np.random.Generator) -> SpineParams:
    """Normal variation of lumbar anatomy (sizes from published lumbar morphometry, rounded)."""
    size = rng.uniform(0.85, 1.15)
    lordosis = rng.uniform(10.0, 80.0)
    sacral_slope = float(np.clip(0.5 * lordosis + 8 + rng.normal(0, 4), 10, 55))
    heights = {"T12": 23, "L1": 25, "L2": 26.5, "L3": 27, "L4": 27, "L5": 26, "S1": 24}
    depths = {"T12": 30, "L1": 32, "L2": 33.5, "L3": 35, "L4": 36, "L5": 36, "S1": 35}
    widths = {"T12": 38, "L1": 42, "L2": 44, "L3": 46, "L4": 48, "L5": 50, "S1": 48}
    discs = {"T12/L1": 7, "L1/L2": 8.5, "L2/L3": 9.5, "L3/L4": 10.5, "L4/L5": 11, "L5/S1": 10}
    j = lambda v: float(v * size * rng.uniform(0.94, 1.06))  # noqa: E731
    # Lordosis is carried mostly by the lower discs; bodies wedge a little.
    share = {"L1/L2": 0.07, "L2/L3": 0.10, "L3/L4": 0.14, "L4/L5": 0.20, "L5/S1": 0.29,
             "L1": 0.02, "L2": 0.03, "L3": 0.03, "L4": 0.05, "L5": 0.07}
    raw = {k: v * rng.uniform(0.7, 1.3) for k, v in share.items()}
    total = sum(raw.values())
    wedges = {k: lordosis * v / total for k, v in raw.items()}
    wedges.update({"T12/L1": rng.uniform(-3, 3), "T12": rng.uniform(-4, 0), "S1": rng.uniform(-8, -2)})
    return SpineParams(
        lordosis_deg=float(lordosis), sacral_slope_deg=sacral_slope, size=size,
        body_heights={k: j(v) for k, v in heights.items()}, body_depths={k: j(v) for k, v in depths.items()},
        body_widths={k: j(v) for k, v in widths.items()}, disc_heights={k: j(v) for k, v in discs.items()},
        wedges_deg=wedges, canal_ap_radius=rng.uniform(6.5, 9.0) * size, canal_lr_radius=rng.uniform(10, 12.5) * size,
        canal_gap=rng.uniform(1.5, 3.0), cortex=rng.uniform(1.0, 1.6), fat_thickness=rng.uniform(8, 40),
        body_lr=rng.uniform(140, 185) * size, body_ap=rng.uniform(95, 135) * size,
    )


def build_chain(p: SpineParams, disc_height_scale: dict[str, float]) -> dict[str, Element]:
    """Stack discs and bodies upward from the S1 superior endplate and the sacrum downward."""
    chain: dict[str, Element] = {}
    top_angle = np.deg2rad(p.sacral_slope_deg)
    s1_top = np.array([0.0, 0.0])

    def up(name: str, bottom: np.ndarray, angle: float, height: float, depth: float, width: float) -> Element:
        wedge = np.deg2rad(p.wedges_deg.get(name, 0.0))
        mid_angle = angle - wedge / 2
        top = bottom + height * _normal(mid_angle)
        el = Element(name, bottom, angle, top, angle - wedge, depth, width)
        chain[name] = el
        return el

    # S1 body hangs below its superior endplate; the rest of the sacrum curves backwards below it.
    s1_h, s1_wedge = p.body_heights["S1"], np.deg2rad(p.wedges_deg["S1"])
    s1_bottom_angle = top_angle + s1_wedge
    bottom = s1_top - s1_h * _normal((top_angle + s1_bottom_angle) / 2)
    chain["S1"] = Element("S1", bottom, s1_bottom_angle, s1_top, top_angle, p.body_depths["S1"], p.body_widths["S1"])
    el = chain["S1"]
    for i in range(3):  # S2-S4 as one label, shrinking
        h, t = 0.8 ** (i + 1) * s1_h, el.bottom_angle + np.deg2rad(12)
        b = el.bottom - h * _normal((el.bottom_angle + t) / 2) - 0.15 * h * _dir(t)
        el = Element(f"sacrum{i}", b, t, el.bottom, el.bottom_angle, 0.85 ** (i + 1) * p.body_depths["S1"],
                     0.85 ** (i + 1) * p.body_widths["S1"])
        chain[el.name] = el

    below, angle = s1_top, top_angle
    lower = "S1"
    for disc, upper in zip(reversed(DISCS), reversed(VERTEBRAE[:-1])):
        dh = p.disc_heights[disc] * disc_height_scale.get(disc, 1.0)
        d_depth = (p.body_depths[upper] + p.body_depths[lower]) / 2
        d_width = (p.body_widths[upper] + p.body_widths[lower]) / 2
        d = up(disc, below, angle, dh, d_depth, d_width)
        # Anterolisthesis: the upper vertebra sits forward (towards -u) on its disc.
        shift = -p.slips_mm.get(disc, 0.0) * _dir(d.top_angle)
        d.top = d.top + shift
        b = up(upper, d.top, d.top_angle, p.body_heights[upper], p.body_depths[upper], p.body_widths[upper])
        below, angle, lower = b.top, b.top_angle, upper
    return chain


def lordosis_truth(chain: dict[str, Element]) -> dict[str, float]:
    """Cobb angles from the endplate angles: L1 superior to S1 superior, and to L5 inferior."""
    l1 = chain["L1"].top_angle
    return {"L1-S1": float(np.rad2deg(chain["S1"].top_angle - l1)),
            "L1-L5": float(np.rad2deg(chain["L5"].bottom_angle - l1))}
