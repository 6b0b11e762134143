"""Pathologies of one study: what is sampled, how grades follow from geometry, the study label.

Grades that describe narrowing (canal, foramina, subarticular recesses) are not sampled: the
generator samples the tissue that intrudes (herniation, ligament, facet) and then measures how much
it narrows, so the grade in the truth is what the masks show.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from training.phantom.anatomy import LUMBAR_DISCS, LUMBAR_VERTEBRAE

STUDY_CLASSES = ["healthy", "herniated_disc", "spinal_stenosis", "spondylosis"]
GRADES = ["normal_mild", "moderate", "severe"]
# Fraction of the normal area lost at the disc mid-plane -> grade.
NARROWING_THRESHOLDS = (0.30, 0.60)
MARROW_TYPES = ["normal", "modic1", "modic2", "modic3", "lesion"]


def grade_of(narrowing: float) -> str:
    lo, hi = NARROWING_THRESHOLDS
    return GRADES[0] if narrowing < lo else GRADES[1] if narrowing < hi else GRADES[2]


@dataclass
class DiscFindings:
    herniation: str = "none"  # none | bulge | protrusion | extrusion
    herniation_side: str = "central"  # central | left | right
    herniation_depth_mm: float = 0.0  # beyond the posterior disc margin
    herniation_base_mm: float = 0.0
    bulge_mm: float = 0.0
    flavum_mm: float = 0.0  # ligamentum flavum thickening into the canal
    facet_left: float = 0.0  # facet hypertrophy, 0 (none) .. 1 (marked)
    facet_right: float = 0.0
    foraminal_left: float = 0.0  # disc-osteophyte complex in the foramen, 0 (none) .. 1 (marked)
    foraminal_right: float = 0.0
    degeneration: str = "none"  # none | mild | moderate | severe
    height_loss: float = 0.0  # fraction of the disc height
    nucleus_t2: float = 1.0  # factor on nucleus T2 (dark disc)
    slip_pct: float = 0.0  # anterolisthesis of the upper vertebra, % of the endplate


@dataclass
class VertebraFindings:
    marrow: str = "normal"
    modic_endplate: str = "inferior"
    modic_thickness_mm: float = 0.0
    modic_extent: float = 0.0  # fraction of the endplate's AP depth
    modic_strength: float = 0.0  # 0..1 blend towards the full Modic signal
    lesion_radius_mm: float = 0.0
    lesion_uw: tuple[float, float] = (0.0, 0.0)  # lesion centre as a fraction of depth/2, height/2
    osteophyte_mm: float = 0.0


@dataclass
class Findings:
    discs: dict[str, DiscFindings] = field(default_factory=dict)
    vertebrae: dict[str, VertebraFindings] = field(default_factory=dict)
    target_class: str = "healthy"

    def as_dict(self) -> dict:
        return {"discs": {k: asdict(v) for k, v in self.discs.items()},
                "vertebrae": {k: asdict(v) for k, v in self.vertebrae.items()}}


DEGENERATION = {  # grade: (height loss range, nucleus T2 factor range)
    "none": ((0.0, 0.0), (1.0, 1.0)), "mild": ((0.05, 0.2), (0.6, 0.85)),
    "moderate": ((0.2, 0.4), (0.35, 0.6)), "severe": ((0.4, 0.6), (0.15, 0.35)),
}
LOWER_WEIGHTS = np.array([0.08, 0.12, 0.2, 0.32, 0.28])  # L1/L2 .. L5/S1: where disease usually is


def _levels(rng: np.random.Generator, n: int) -> list[str]:
    return list(rng.choice(LUMBAR_DISCS, size=n, replace=False, p=LOWER_WEIGHTS))


def _degenerate(d: DiscFindings, grade: str, rng: np.random.Generator) -> None:
    (h0, h1), (t0, t1) = DEGENERATION[grade]
    d.degeneration, d.height_loss, d.nucleus_t2 = grade, rng.uniform(h0, h1), rng.uniform(t0, t1)


def _herniate(d: DiscFindings, kind: str, rng: np.random.Generator) -> None:
    d.herniation = kind
    d.herniation_side = str(rng.choice(["central", "left", "right"], p=[0.4, 0.3, 0.3]))
    if kind == "bulge":
        d.bulge_mm = rng.uniform(1.0, 2.5)
    elif kind == "protrusion":  # base wider than depth
        d.herniation_depth_mm = rng.uniform(2.0, 5.0)
        d.herniation_base_mm = rng.uniform(1.6, 2.5) * d.herniation_depth_mm + 3
    else:  # extrusion: depth greater than base
        d.herniation_depth_mm = rng.uniform(5.0, 9.0)
        d.herniation_base_mm = rng.uniform(0.6, 0.9) * d.herniation_depth_mm


def sample_findings(rng: np.random.Generator, target: str) -> Findings:
    """Findings aimed at one study class; background findings that do not change it are added."""
    f = Findings(discs={d: DiscFindings() for d in LUMBAR_DISCS},
                 vertebrae={v: VertebraFindings() for v in LUMBAR_VERTEBRAE}, target_class=target)
    for d in f.discs.values():  # background: age-related, mild
        if rng.random() < 0.25:
            _degenerate(d, "mild", rng)
        if rng.random() < 0.12:
            _herniate(d, "bulge", rng)
    if target == "herniated_disc":
        for lv in _levels(rng, int(rng.integers(1, 3))):
            _herniate(f.discs[lv], str(rng.choice(["protrusion", "extrusion"])), rng)
    elif target == "spinal_stenosis":
        for lv in _levels(rng, int(rng.integers(1, 3))):
            d = f.discs[lv]
            d.flavum_mm = rng.uniform(2.5, 7.5)
            d.facet_left, d.facet_right = rng.uniform(0.3, 1.0), rng.uniform(0.3, 1.0)
            if rng.random() < 0.5:
                _herniate(d, "bulge", rng)
    elif target == "spondylosis":
        for lv in _levels(rng, int(rng.integers(1, 4))):
            _degenerate(f.discs[lv], str(rng.choice(["moderate", "severe"])), rng)
        for v in rng.choice(LUMBAR_VERTEBRAE[:-1], size=int(rng.integers(2, 5)), replace=False):
            f.vertebrae[str(v)].osteophyte_mm = rng.uniform(2.0, 6.0)
        if rng.random() < 0.3:
            f.discs[str(rng.choice(["L4/L5", "L5/S1"]))].slip_pct = rng.uniform(10, 30)
    p_foraminal = 0.3 if target in ("spinal_stenosis", "spondylosis") else 0.08
    for d in f.discs.values():  # unilateral changes narrow a foramen or a recess alone
        if rng.random() < 0.1:
            setattr(d, str(rng.choice(["facet_left", "facet_right"])), rng.uniform(0.2, 1.0))
        if rng.random() < p_foraminal:
            setattr(d, str(rng.choice(["foraminal_left", "foraminal_right"])), rng.uniform(0.1, 1.0))
    _sample_marrow(f, rng)
    return f


def _sample_marrow(f: Findings, rng: np.random.Generator) -> None:
    """Marrow changes are independent of the study class (they have their own pipeline)."""
    n = int(rng.choice([0, 1, 2, 3], p=[0.45, 0.3, 0.17, 0.08]))
    for v in rng.choice(LUMBAR_VERTEBRAE, size=n, replace=False):
        vf = f.vertebrae[str(v)]
        vf.marrow = str(rng.choice(MARROW_TYPES[1:], p=[0.3, 0.3, 0.15, 0.25]))
        if vf.marrow == "lesion":
            vf.lesion_radius_mm = rng.uniform(3.0, 9.0)
            vf.lesion_uw = (rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4))
        else:
            vf.modic_endplate = str(rng.choice(["superior", "inferior"]))
            vf.modic_thickness_mm = rng.uniform(3.0, 10.0)
            vf.modic_extent = rng.uniform(0.35, 1.0)
            vf.modic_strength = rng.uniform(0.45, 1.0)


def study_class(levels: dict[str, dict]) -> str:
    """The four-class study label, by rule, from the per-level truth.

    1. spinal_stenosis: any level with moderate or severe canal stenosis;
    2. herniated_disc: otherwise, any protrusion or extrusion;
    3. spondylosis: otherwise, any osteophyte, moderate/severe disc degeneration or slip >= 10 %;
    4. healthy: none of these.
    """
    discs = [v for k, v in levels.items() if "/" in k]
    verts = [v for k, v in levels.items() if "/" not in k]
    if any(d["canal_stenosis"] in ("moderate", "severe") for d in discs):
        return "spinal_stenosis"
    if any(d["herniation"] in ("protrusion", "extrusion") for d in discs):
        return "herniated_disc"
    if (any(v.get("osteophytes", False) for v in verts)
            or any(d["disc_degeneration"] in ("moderate", "severe") for d in discs)
            or any(d["spondylolisthesis_pct"] >= 10 for d in discs)):
        return "spondylosis"
    return "healthy"
