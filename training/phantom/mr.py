"""MR signal from tissue parameters, and the acquisition's imperfections.

Signals follow the spin-echo and inversion-recovery equations from proton density, T1 and T2, so
that each contrast (T1, T2, STIR) gets its look from physics rather than from a painted grey value:
Modic type 1 (oedema) is dark on T1 and bright on T2 and STIR, type 2 (fat) bright on T1 and dark on
STIR, type 3 (sclerosis) dark on all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# (proton density, T1 ms, T2 ms) at 1.5 T. FSE makes fat bright on T2; its T2 is set to match.
TISSUE_PARAMS: dict[str, tuple[float, float, float]] = {
    "air": (0.0, 1000, 1), "fat": (1.0, 260, 140), "muscle": (0.8, 870, 45),
    "soft_tissue": (0.75, 900, 60), "viscera": (0.8, 700, 70), "cortical_bone": (0.06, 1000, 2),
    "marrow": (0.9, 420, 75), "annulus": (0.7, 900, 40), "nucleus": (0.95, 1100, 130),
    "csf": (1.0, 4000, 1800), "nerve": (0.75, 850, 85), "ligament": (0.55, 700, 35),
    "posterior_bone": (0.6, 500, 55), "lesion": (0.9, 1050, 110),
    "modic1": (0.92, 1050, 115), "modic2": (1.0, 300, 110), "modic3": (0.25, 1000, 25),
}
FIELD_T1_SCALE = {1.5: 1.0, 3.0: 1.25}


@dataclass(frozen=True)
class Contrast:
    name: str  # T1 | T2 | STIR
    tr: float
    te: float
    ti: float | None = None
    field_t: float = 1.5


def tissue_params(name: str, nucleus_t2: dict[str, float]) -> tuple[float, float, float]:
    """Parameters of a registered tissue name, including per-study variants:
    "nucleus L4/L5" (dark disc: T2 and PD scaled), "modic1 0.700" (blend towards marrow)."""
    if name.startswith("nucleus "):
        pd, t1, t2 = TISSUE_PARAMS["nucleus"]
        k = nucleus_t2[name.split(" ", 1)[1]]
        ann = TISSUE_PARAMS["annulus"]
        return pd * (0.75 + 0.25 * k), t1 * (0.7 + 0.3 * k), ann[2] + (t2 - ann[2]) * k
    if name.startswith("modic"):
        kind, strength = name.split(" ")
        s = float(strength)
        a, b = np.array(TISSUE_PARAMS["marrow"]), np.array(TISSUE_PARAMS[kind])
        pd, t1, t2 = a + s * (b - a)
        return float(pd), float(t1), float(t2)
    return TISSUE_PARAMS[name]


def signal_table(names: list[str], contrast: Contrast, nucleus_t2: dict[str, float]) -> np.ndarray:
    """Signal of every tissue id under one contrast."""
    out = np.zeros(len(names), dtype=np.float32)
    k1 = FIELD_T1_SCALE[contrast.field_t]
    for i, n in enumerate(names):
        pd, t1, t2 = tissue_params(n, nucleus_t2)
        t1 *= k1
        if contrast.ti is None:
            s = pd * (1 - np.exp(-contrast.tr / t1)) * np.exp(-contrast.te / t2)
        else:
            s = pd * abs(1 - 2 * np.exp(-contrast.ti / t1) + np.exp(-contrast.tr / t1)) * np.exp(-contrast.te / t2)
        out[i] = s
    return out


@dataclass(frozen=True)
class Degradation:
    noise: float  # Rician sigma as a fraction of the brightest tissue signal
    bias: float  # amplitude of the smooth multiplicative field
    blur_px: float
    texture: float  # amplitude of smooth tissue inhomogeneity
    bits: int  # BitsStored
    fill: float  # fraction of the stored range the brightest tissue reaches
    seed: int


def degrade(clean: np.ndarray, d: Degradation, ref: float) -> np.ndarray:
    """Texture, bias field, blur and Rician noise on a (slices, rows, cols) magnitude volume."""
    rng = np.random.default_rng(d.seed)
    ns, nr, nc = clean.shape
    img = clean.astype(np.float32)
    if d.texture > 0:
        low = rng.normal(size=(ns, max(nr // 16, 2), max(nc // 16, 2))).astype(np.float32)
        low = ndimage.zoom(low, (1, nr / low.shape[1], nc / low.shape[2]), order=1)[:, :nr, :nc]
        img *= 1 + d.texture * ndimage.gaussian_filter(low, (0, 2, 2))
    rr, cc = np.meshgrid(np.linspace(-1, 1, nr), np.linspace(-1, 1, nc), indexing="ij")
    coeff = rng.normal(size=5)
    field = 1 + d.bias * np.tanh(coeff[0] * rr + coeff[1] * cc + 0.5 * (coeff[2] * rr * rr + coeff[3] * cc * cc + coeff[4] * rr * cc))
    img *= field.astype(np.float32)[None]
    if d.blur_px > 0:
        img = ndimage.gaussian_filter(img, (0, d.blur_px, d.blur_px))
    sigma = d.noise * ref
    img = np.sqrt((img + rng.normal(0, sigma, img.shape)) ** 2 + rng.normal(0, sigma, img.shape) ** 2)
    return img.astype(np.float32)


def quantise(img: np.ndarray, d: Degradation, ref: float) -> np.ndarray:
    """Scale so the brightest tissue fills `fill` of the stored range; unsigned integers."""
    top = (1 << d.bits) - 1
    scaled = np.clip(np.rint(img / ref * d.fill * top), 0, top)
    return scaled.astype(np.uint16)
