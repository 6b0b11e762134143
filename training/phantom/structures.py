"""The shapes of one study, in painting order (later shapes overwrite earlier ones)."""

from __future__ import annotations

import numpy as np

from training.phantom.anatomy import DISCS, LABEL_VALUES, VERTEBRAE, Element, Shape, SpineParams, element_box, superellipse
from training.phantom.pathology import DiscFindings, Findings, VertebraFindings


class Tissues:
    """Tissue names to small integers; pathologies register their own variants per level."""

    def __init__(self, names: list[str]):
        self.names: list[str] = list(names)

    def __call__(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)


def _canal_center(el: Element, p: SpineParams) -> float:
    return el.depth / 2 + p.canal_gap + p.canal_ap_radius


def _spine_profile(chain: dict[str, Element], p: SpineParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z, anterior y of the bodies and posterior y of the canal along the chain, for soft tissue."""
    rows = []
    for el in chain.values():
        ant = el.to_patient(0, -el.depth / 2, 0)
        post = el.to_patient(0, _canal_center(el, p) + p.canal_ap_radius, 0)
        rows.append((ant[2], ant[1], post[1]))
    rows.sort()
    a = np.array(rows)
    return a[:, 0], a[:, 1], a[:, 2]


def build_shapes(p: SpineParams, chain: dict[str, Element], f: Findings, t: Tissues,
                 intrusions: bool = True) -> list[Shape]:
    """All shapes of the study. `intrusions=False` leaves out what narrows the canal and foramina,
    which gives the normal areas that narrowing is measured against."""
    shapes: list[Shape] = []
    shapes += _soft_tissue(p, chain, t)
    rl = p.canal_lr_radius
    none_d = DiscFindings()
    for name in DISCS:
        el = chain[name]
        for side in (-1, 1):
            shapes.append(_foramen(el, p, side, t))
            shapes.append(_nerve_root(el, p, side, t))
    for name in VERTEBRAE[:-1] + ["S1"] + DISCS:
        shapes.append(_canal(chain[name], p, t))
    for name in VERTEBRAE:
        shapes += _posterior_elements(chain[name], p, t)
    for name in DISCS:
        el, df = chain[name], f.discs.get(name, none_d)
        use = df if intrusions else none_d
        shapes.append(_flavum(el, p, use.flavum_mm, t))
        for side, hyp, spur in ((1, use.facet_left, use.foraminal_left), (-1, use.facet_right, use.foraminal_right)):
            shapes.append(_facet(el, p, side, hyp, t))  # +x is the patient's left
            if spur > 0:
                shapes.append(_foraminal_spur(el, name, p, side, spur, t))
        shapes.append(_disc(el, name, df, use.bulge_mm, t))
        if intrusions and df.herniation in ("protrusion", "extrusion"):
            shapes.append(_herniation(el, name, df, rl, t))
    none_v = VertebraFindings()
    for name in VERTEBRAE:
        vf = f.vertebrae.get(name, none_v)
        shapes.append(_body(chain[name], LABEL_VALUES[name], p, vf, t))
        if vf.osteophyte_mm > 0:
            shapes += _osteophytes(chain[name], LABEL_VALUES[name], vf.osteophyte_mm, t)
    for i in range(3):
        shapes.append(_body(chain[f"sacrum{i}"], LABEL_VALUES["sacrum"], p, none_v, t))
    if p.s1_s2_remnant_mm > 0:
        shapes.append(_remnant_disc(chain["sacrum0"], p.s1_s2_remnant_mm, t))
    return shapes


def _remnant_disc(el: Element, thickness: float, t: Tissues) -> Shape:
    """The rudimentary S1/S2 disc that many adults keep: a thin band of disc tissue just below S1,
    inside the fused sacrum. It is part of the sacrum, not a mobile disc, so S1 must still be
    recognised as the lowest vertebra with a disc above it."""
    ru, rx, h = 0.35 * el.depth, 0.35 * el.width, el.height

    def paint(q: np.ndarray):
        x, u, w, below_top, above_bottom = el.local(q)
        m = (superellipse(u, x, ru, rx, 2.2) <= 1) & (below_top >= 0.5) & (below_top <= 0.5 + thickness)
        return m, t("nucleus")

    return Shape("S1/S2 remnant disc", LABEL_VALUES["sacrum"], *element_box(el, -ru, ru, -h, h, -rx, rx), paint)


def _soft_tissue(p: SpineParams, chain: dict[str, Element], t: Tissues) -> list[Shape]:
    z, y_ant, y_post = _spine_profile(chain, p)
    big_lo, big_hi = np.array([-300.0, -400, -500]), np.array([300.0, 400, 500])
    fat, soft, viscera, muscle = t("fat"), t("soft_tissue"), t("viscera"), t("muscle")
    back = 45 * p.size

    def skin_centre(q: np.ndarray) -> np.ndarray:
        return np.interp(q[..., 2], z, y_post) + back + p.fat_thickness - p.body_ap

    def outline(q: np.ndarray):
        yc = skin_centre(q)
        return (q[..., 0] / p.body_lr) ** 2 + ((q[..., 1] - yc) / p.body_ap) ** 2 <= 1, fat

    def inner(q: np.ndarray):
        yc = skin_centre(q)
        ft = p.fat_thickness
        m = (q[..., 0] / (p.body_lr - ft)) ** 2 + ((q[..., 1] - yc) / (p.body_ap - ft)) ** 2 <= 1
        tissue = np.where(q[..., 1] < np.interp(q[..., 2], z, y_ant) - 8, viscera, soft)
        return m, tissue

    def paraspinal(q: np.ndarray):
        yp = np.interp(q[..., 2], z, y_post)
        m = (q[..., 0] / (48 * p.size)) ** 2 + ((q[..., 1] - yp - 0.5 * back) / (0.5 * back)) ** 2 <= 1
        return m & (np.abs(q[..., 0]) > 4), muscle

    return [Shape("outline", LABEL_VALUES["subcutaneous_fat"], big_lo, big_hi, outline),
            Shape("body", LABEL_VALUES["body"], big_lo, big_hi, inner),
            Shape("paraspinal", LABEL_VALUES["paraspinal_muscle"], big_lo, big_hi, paraspinal)]


def _foramen(el: Element, p: SpineParams, side: int, t: Tissues) -> Shape:
    rl, h = p.canal_lr_radius, el.height
    u0, u1 = el.depth / 2 - 2, el.depth / 2 + p.canal_gap + 2 * p.canal_ap_radius - 2
    w0, w1 = -h / 2 - 6, h / 2 + 9
    fat = t("fat")

    def paint(q: np.ndarray):
        x, u, w, _, _ = el.local(q)
        xs = side * x
        return (xs > rl + 0.5) & (xs < rl + 9) & (u > u0) & (u < u1) & (w > w0) & (w < w1), fat

    x0, x1 = sorted((side * (rl + 0.5), side * (rl + 9)))
    return Shape(f"foramen {el.name}", LABEL_VALUES["neural_foramen"], *element_box(el, u0, u1, w0, w1, x0, x1), paint)


def _nerve_root(el: Element, p: SpineParams, side: int, t: Tissues) -> Shape:
    rl, h = p.canal_lr_radius, el.height
    uc, wc, r = el.depth / 2 + p.canal_gap + 2.5, h / 2 + 4, 2.2
    nerve = t("nerve")

    def paint(q: np.ndarray):
        x, u, w, _, _ = el.local(q)
        xs = side * x
        return (xs > rl - 1) & (xs < rl + 10) & ((u - uc) ** 2 + (w - wc) ** 2 <= r * r), nerve

    x0, x1 = sorted((side * (rl - 1), side * (rl + 10)))
    return Shape(f"root {el.name}", LABEL_VALUES["nerve_root"], *element_box(el, uc - r, uc + r, wc - r, wc + r, x0, x1), paint)


def _canal(el: Element, p: SpineParams, t: Tissues) -> Shape:
    ra, rl = p.canal_ap_radius, p.canal_lr_radius
    uc = _canal_center(el, p)
    csf, nerve = t("csf"), t("nerve")

    def paint(q: np.ndarray):
        x, u, w, below_top, above_bottom = el.local(q)
        m = ((u - uc) / ra) ** 2 + (x / rl) ** 2 <= 1
        m &= (below_top >= -0.05) & (above_bottom >= -0.05)
        cauda = ((u - uc - 0.3 * ra) / (0.45 * ra)) ** 2 + (x / (0.55 * rl)) ** 2 <= 1
        return m, np.where(cauda, nerve, csf)

    h = el.height + el.depth * 0.6
    return Shape(f"canal {el.name}", LABEL_VALUES["canal"], *element_box(el, uc - ra, uc + ra, -h / 2, h / 2, -rl, rl), paint)


def _posterior_elements(el: Element, p: SpineParams, t: Tissues) -> list[Shape]:
    ra, rl, h = p.canal_ap_radius, p.canal_lr_radius, el.height
    uc = _canal_center(el, p)
    bone = t("posterior_bone")
    u_end = uc + ra + 30 * p.size

    def paint(q: np.ndarray):
        x, u, w, _, _ = el.local(q)
        ax = np.abs(x)
        pedicle = (((ax - rl - 4.5) / 3.5) ** 2 + ((w - 0.15 * h) / (0.3 * h)) ** 2 <= 1) & (u > el.depth / 2 - 1) & (u < uc + ra)
        q_in = ((u - uc) / ra) ** 2 + (x / rl) ** 2
        q_out = ((u - uc) / (ra + 6)) ** 2 + (x / (rl + 6)) ** 2
        lamina = (u > uc) & (q_in > 1) & (q_out <= 1) & (w > -0.35 * h) & (w < 0.45 * h)
        s = u - (uc + ra)
        spinous = (s > 2) & (u < u_end) & (ax < 3.5) & (w < 0.2 * h - 0.25 * s) & (w > -0.45 * h - 0.25 * s)
        return pedicle | lamina | spinous, bone

    lo, hi = element_box(el, el.depth / 2 - 2, u_end, -h / 2 - 10, h / 2 + 2, -rl - 9, rl + 9)
    return [Shape(f"posterior {el.name}", LABEL_VALUES["posterior_elements"], lo, hi, paint)]


def _flavum(el: Element, p: SpineParams, thick: float, t: Tissues) -> Shape:
    ra, rl, h = p.canal_ap_radius, p.canal_lr_radius, el.height
    uc = _canal_center(el, p)
    lig = t("ligament")

    def paint(q: np.ndarray):
        x, u, w, _, _ = el.local(q)
        outer = ((u - uc) / (ra + 3)) ** 2 + (x / (rl + 3)) ** 2 <= 1
        inner = ((u - uc + thick / 2) / (ra - thick / 2)) ** 2 + (x / (rl - 0.6 * thick)) ** 2 <= 1
        return outer & ~inner & (u > uc + 0.1 * ra - thick) & (np.abs(w) <= h / 2 + 4), lig

    return Shape(f"flavum {el.name}", LABEL_VALUES["ligamentum_flavum"],
                 *element_box(el, uc - thick - ra, uc + ra + 3, -h / 2 - 4, h / 2 + 4, -rl - 3, rl + 3), paint)


def _facet(el: Element, p: SpineParams, side: int, hyp: float, t: Tissues) -> Shape:
    ra, rl = p.canal_ap_radius, p.canal_lr_radius
    uc = _canal_center(el, p)
    cx, cu = side * (rl + 3.5 - 3 * hyp), uc + 0.55 * ra - 2 * hyp
    rx, ru, rw = 4 + 3 * hyp, 5 + 3 * hyp, 7 + 2 * hyp
    bone = t("posterior_bone")

    def paint(q: np.ndarray):
        x, u, w, _, _ = el.local(q)
        return ((x - cx) / rx) ** 2 + ((u - cu) / ru) ** 2 + (w / rw) ** 2 <= 1, bone

    return Shape(f"facet {el.name}", LABEL_VALUES["posterior_elements"],
                 *element_box(el, cu - ru, cu + ru, -rw, rw, cx - rx, cx + rx), paint)


def _foraminal_spur(el: Element, name: str, p: SpineParams, side: int, sev: float, t: Tissues) -> Shape:
    """Disc-osteophyte complex bulging from the posterolateral disc margin into the foramen."""
    cx, cu = side * (p.canal_lr_radius + 5), el.depth / 2 - 2 + 4 * sev
    rx, ru, rw = 5.0, 2 + 6 * sev, 3 + 3 * sev
    annulus = t("annulus")

    def paint(q: np.ndarray):
        x, u, w, _, _ = el.local(q)
        return ((x - cx) / rx) ** 2 + ((u - cu) / ru) ** 2 + (w / rw) ** 2 <= 1, annulus

    return Shape(f"foraminal {name}", LABEL_VALUES[name], *element_box(el, cu - ru, cu + ru, -rw, rw, cx - rx, cx + rx), paint)


def _disc(el: Element, name: str, df: DiscFindings, bulge: float, t: Tissues) -> Shape:
    ru, rx, h = el.depth / 2 + bulge, el.width / 2 + bulge, el.height
    annulus = t("annulus")
    nucleus = t(f"nucleus {name}") if df.nucleus_t2 < 1 else t("nucleus")

    def paint(q: np.ndarray):
        x, u, w, below_top, above_bottom = el.local(q)
        m = (superellipse(u, x, ru, rx, 2.2) <= 1) & (below_top >= 0) & (above_bottom >= 0)
        nuc = ((u - 0.05 * el.depth) / (0.32 * el.depth)) ** 2 + (x / (0.32 * el.width)) ** 2 + (w / (0.36 * h)) ** 2 <= 1
        return m, np.where(nuc, nucleus, annulus)

    return Shape(f"disc {name}", LABEL_VALUES[name], *element_box(el, -ru, ru, -h, h, -rx, rx), paint)


def _herniation(el: Element, name: str, df: DiscFindings, rl: float, t: Tissues) -> Shape:
    depth, base = df.herniation_depth_mm, df.herniation_base_mm
    cx = {"central": 0.0, "left": 0.45 * rl, "right": -0.45 * rl}[df.herniation_side]
    cu = el.depth / 2 + depth / 2 - 0.5
    ru, rx = depth / 2 + 0.5, base / 2
    rw = min(el.height / 2 + (2.5 if df.herniation == "extrusion" else 0.0), 0.5 * base + 2)
    nucleus = t(f"nucleus {name}") if df.nucleus_t2 < 1 else t("nucleus")

    def paint(q: np.ndarray):
        x, u, w, _, _ = el.local(q)
        return ((x - cx) / rx) ** 2 + ((u - cu) / ru) ** 2 + (w / rw) ** 2 <= 1, nucleus

    return Shape(f"herniation {name}", LABEL_VALUES[name],
                 *element_box(el, cu - ru, cu + ru, -rw, rw, cx - rx, cx + rx), paint)


def _body(el: Element, label: int, p: SpineParams, vf: VertebraFindings, t: Tissues) -> Shape:
    ru, rx, c = el.depth / 2, el.width / 2, p.cortex
    cortex, marrow = t("cortical_bone"), t("marrow")
    modic = t(f"{vf.marrow} {vf.modic_strength:.3f}") if vf.marrow.startswith("modic") else None
    lesion = t("lesion") if vf.marrow == "lesion" else None
    h = el.height

    def paint(q: np.ndarray):
        x, u, w, below_top, above_bottom = el.local(q)
        m = (superellipse(u, x, ru, rx) <= 1) & (below_top >= 0) & (above_bottom >= 0)
        inner = (superellipse(u, x, ru - c, rx - c) <= 1) & (below_top >= c) & (above_bottom >= c)
        tissue = np.where(inner, marrow, cortex)
        if modic is not None:
            dist = below_top if vf.modic_endplate == "superior" else above_bottom
            band = inner & (dist < c + vf.modic_thickness_mm) & (np.abs(u) < vf.modic_extent * ru)
            tissue = np.where(band, modic, tissue)
        if lesion is not None:
            lu, lw = vf.lesion_uw
            r2 = (u - lu * ru) ** 2 + (w - lw * h / 2) ** 2 + x ** 2
            tissue = np.where(inner & (r2 <= vf.lesion_radius_mm ** 2), lesion, tissue)
        return m, tissue

    return Shape(f"body {el.name}", label, *element_box(el, -ru, ru, -h, h, -rx, rx), paint)


def _osteophytes(el: Element, label: int, size: float, t: Tissues) -> list[Shape]:
    """Anterior spurs at both endplate corners, growing along the endplate plane."""
    bone = t("cortical_bone")
    shapes = []
    for which in ("superior", "inferior"):
        wc = el.height / 2 if which == "superior" else -el.height / 2
        cu = -el.depth / 2 - 0.3 * size
        rx, ru, rw = 0.35 * el.width, size, 0.45 * size + 1

        def paint(q: np.ndarray, wc: float = wc, cu: float = cu, rx: float = rx, ru: float = ru, rw: float = rw):
            x, u, w, _, _ = el.local(q)
            return (x / rx) ** 2 + ((u - cu) / ru) ** 2 + ((w - wc) / rw) ** 2 <= 1, bone

        shapes.append(Shape(f"osteophyte {el.name} {which}", label,
                            *element_box(el, cu - ru, cu + ru, wc - rw, wc + rw, -rx, rx), paint))
    return shapes
