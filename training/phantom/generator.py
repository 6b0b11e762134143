"""One synthetic lumbar spine MR study: design (anatomy, pathology, truth), acquisition, files.

`design_study` is cheap (no image), so statistics over thousands of studies need no rendering;
`generate_study` renders and writes the DICOM series and `truth/`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dicomnode.config import lordosis_class
from training.dicom_writer import StudyInfo, write_mr_series
from training.phantom.acquisition import acquisitions, study_info
from training.phantom.anatomy import (
    LABEL_VALUES,
    LUMBAR_DISCS,
    LUMBAR_VERTEBRAE,
    Element,
    Shape,
    SpineParams,
    build_chain,
    lordosis_truth,
    sample_anatomy,
)
from training.phantom.geometry import SlicePlane
from training.phantom.mr import degrade, quantise, signal_table
from training.phantom.pathology import STUDY_CLASSES, Findings, grade_of, sample_findings, study_class
from training.phantom.render import paint_plane, render_series
from training.phantom.structures import Tissues, build_shapes

SAGITTAL = ("T2", "T1", "STIR")


@dataclass(frozen=True)
class PhantomOptions:
    contrasts: tuple[str, ...] = SAGITTAL
    axial: bool = False
    study_class: str | None = None  # None: drawn uniformly from the four classes
    lordosis_deg: float | None = None
    max_matrix: int = 640  # smaller values speed up tests and training data
    # sagittal field of view ending this far below the top of S1 (mm, drawn in the range), as most
    # real lumbar series do; None: the whole sacrum is in view
    fov_end_mm: tuple[float, float] | None = None


@dataclass
class StudyDesign:
    seed: int
    params: SpineParams
    findings: Findings
    chain: dict[str, Element]
    tissues: Tissues
    shapes: list[Shape]
    levels: dict[str, dict] = field(default_factory=dict)
    study_class: str = "healthy"

    @property
    def lordosis(self) -> dict[str, float]:
        return lordosis_truth(self.chain)

    @property
    def nucleus_t2(self) -> dict[str, float]:
        return {k: v.nucleus_t2 for k, v in self.findings.discs.items()}


def design_study(seed: int, options: PhantomOptions = PhantomOptions()) -> StudyDesign:
    """Anatomy and pathology of one study, with the per-level truth measured on the geometry.

    The study class is a target: if the measured grades give another class by the written rule
    (a large herniation can make moderate stenosis), the findings are drawn again, a few times.
    """
    rng = np.random.default_rng([seed, 1])
    target = options.study_class or str(rng.choice(STUDY_CLASSES))
    variant = np.random.default_rng([seed, 3])  # its own stream: the other draws of a seed stay as they were
    remnant = float(variant.uniform(1.5, 4.0)) if variant.random() < 0.5 else 0.0
    for _ in range(8):
        params = sample_anatomy(rng)
        params.s1_s2_remnant_mm = remnant
        if options.lordosis_deg is not None:
            params.wedges_deg = _rescale_wedges(params, options.lordosis_deg)
        findings = sample_findings(rng, target)
        d = _assemble(seed, params, findings)
        if d.study_class == target:
            break
    return d


def _rescale_wedges(p: SpineParams, lordosis: float) -> dict[str, float]:
    keys = [k for k in p.wedges_deg if k not in ("T12/L1", "T12", "S1")]
    total = sum(p.wedges_deg[k] for k in keys)
    out = dict(p.wedges_deg)
    out.update({k: p.wedges_deg[k] * lordosis / total for k in keys})
    p.lordosis_deg = lordosis
    return out


def _assemble(seed: int, params: SpineParams, findings: Findings) -> StudyDesign:
    params.slips_mm = {k: v.slip_pct / 100 * params.body_depths[k.split("/")[0]]
                       for k, v in findings.discs.items() if v.slip_pct > 0}
    chain = build_chain(params, {k: 1 - v.height_loss for k, v in findings.discs.items()})
    tissues = Tissues(["air", "fat"])
    shapes = build_shapes(params, chain, findings, tissues)
    nominal = build_shapes(params, chain, findings, tissues, intrusions=False)
    d = StudyDesign(seed, params, findings, chain, tissues, shapes)
    d.levels = _level_truth(d, nominal)
    d.study_class = study_class(d.levels)
    return d


def disc_midplane(el: Element, spacing: float, half_lr: float, ap: tuple[float, float]) -> SlicePlane:
    """The axial plane through a disc's middle: columns run to the patient's left, rows posterior."""
    e = np.array([0.0, np.cos(el.mid_angle), np.sin(el.mid_angle)])
    x = np.array([1.0, 0.0, 0.0])
    origin = el.to_patient(-half_lr, ap[0], 0.0)
    rows, cols = int((ap[1] - ap[0]) / spacing) + 1, int(2 * half_lr / spacing) + 1
    return SlicePlane(origin, x, e, (spacing, spacing), rows, cols, spacing)


def _areas(shapes: list[Shape], el: Element, rl: float, spacing: float = 0.2) -> dict[str, float]:
    """Areas (mm2) at the disc mid-plane of what narrowing is graded on; `canal_ap` in mm."""
    plane = disc_midplane(el, spacing, half_lr=rl + 12, ap=(el.depth / 2 - 6, el.depth / 2 + 32))
    lab, _ = paint_plane(shapes, plane)
    x = plane.position[0] + np.arange(plane.columns) * spacing
    px = spacing * spacing
    canal = lab == LABEL_VALUES["canal"]
    foramen = np.isin(lab, [LABEL_VALUES["neural_foramen"], LABEL_VALUES["nerve_root"]])
    mid_col = int(np.argmin(np.abs(x)))
    return {"canal": canal.sum() * px, "canal_ap": canal[:, mid_col].sum() * spacing,
            "recess_left": canal[:, x > rl / 3].sum() * px, "recess_right": canal[:, x < -rl / 3].sum() * px,
            "foramen_left": foramen[:, x > 0].sum() * px, "foramen_right": foramen[:, x < 0].sum() * px}


def _level_truth(d: StudyDesign, nominal: list[Shape]) -> dict[str, dict]:
    levels: dict[str, dict] = {}
    rl = d.params.canal_lr_radius
    for name in LUMBAR_DISCS:
        f, el = d.findings.discs[name], d.chain[name]
        a, n = _areas(d.shapes, el, rl), _areas(nominal, el, rl)
        narrow = {k: float(max(0.0, 1 - a[k] / n[k])) for k in n if k != "canal_ap"}
        lv = {
            "herniation": f.herniation, "herniation_side": f.herniation_side if f.herniation != "none" else None,
            "herniation_depth_mm": round(f.herniation_depth_mm, 2),
            "spinal_canal_stenosis": grade_of(narrow["canal"]),
            "left_neural_foraminal_narrowing": grade_of(narrow["foramen_left"]),
            "right_neural_foraminal_narrowing": grade_of(narrow["foramen_right"]),
            "left_subarticular_stenosis": grade_of(narrow["recess_left"]),
            "right_subarticular_stenosis": grade_of(narrow["recess_right"]),
            "canal_narrowing_pct": round(100 * narrow["canal"], 2),
            "canal_ap_mm": round(a["canal_ap"], 2),
            "midplane_areas_mm2": {k: {"measured": round(a[k], 2), "normal": round(n[k], 2)} for k in narrow},
            "foraminal_narrowing_pct": {"left": round(100 * narrow["foramen_left"], 2), "right": round(100 * narrow["foramen_right"], 2)},
            "subarticular_narrowing_pct": {"left": round(100 * narrow["recess_left"], 2), "right": round(100 * narrow["recess_right"], 2)},
            "disc_degeneration": f.degeneration, "disc_height_loss_pct": round(100 * f.height_loss, 2),
            "nucleus_t2_factor": round(f.nucleus_t2, 3), "spondylolisthesis_pct": round(f.slip_pct, 2),
            "flavum_thickening_mm": round(f.flavum_mm, 2),
            "facet_hypertrophy": {"left": round(f.facet_left, 3), "right": round(f.facet_right, 3)},
            "foraminal_disc_osteophyte": {"left": round(f.foraminal_left, 3), "right": round(f.foraminal_right, 3)},
        }
        lv["canal_stenosis"] = lv["spinal_canal_stenosis"]  # the name SPEC section 4 uses
        levels[name] = lv
    for name in LUMBAR_VERTEBRAE:
        v = d.findings.vertebrae[name]
        levels[name] = {"marrow": v.marrow, "marrow_abnormal": v.marrow != "normal",
                        "modic_endplate": v.modic_endplate if v.marrow.startswith("modic") else None,
                        "modic_strength": round(v.modic_strength, 3) if v.marrow.startswith("modic") else None,
                        "lesion_radius_mm": round(v.lesion_radius_mm, 2),
                        "osteophytes": v.osteophyte_mm > 0, "osteophyte_mm": round(v.osteophyte_mm, 2)}
    return levels


def detector_boxes(labels: np.ndarray) -> list[dict]:
    """Per sagittal slice: the lumbar region (L1 to S1 with discs) and every disc, as
    [x0, y0, x1, y1] in pixels (column, row; x1/y1 exclusive)."""
    region_values = [LABEL_VALUES[k] for k in LUMBAR_VERTEBRAE + LUMBAR_DISCS]
    out = []
    for k, sl in enumerate(labels):
        region = np.isin(sl, region_values)
        if not region.any():
            continue
        entry = {"slice_index": k, "region": _bbox(region), "discs": {}}
        for name in LUMBAR_DISCS:
            m = sl == LABEL_VALUES[name]
            if m.any():
                entry["discs"][name] = _bbox(m)
        out.append(entry)
    return out


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.nonzero(mask)
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def truth_document(d: StudyDesign, info: StudyInfo) -> dict:
    angles = d.lordosis
    return {
        "generator": "dicomnode phantom", "seed": d.seed, "study_instance_uid": info.study_instance_uid,
        "study_class": d.study_class,
        "lordosis_deg": {k: round(v, 3) for k, v in angles.items()},
        "lordosis_class": lordosis_class(angles["L1-S1"]),  # the pipeline's own rule, so its class can be compared
        "endplates_patient_mm": {
            "L1_superior": d.chain["L1"].endplate_points("superior").round(3).tolist(),
            "L5_inferior": d.chain["L5"].endplate_points("inferior").round(3).tolist(),
            "S1_superior": d.chain["S1"].endplate_points("superior").round(3).tolist(),
        },
        "levels": d.levels,
        "anatomy": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(d.params).items()
                    if isinstance(v, (float, int))},
        "label_values": LABEL_VALUES,
        "tissues": d.tissues.names,
        "series": [],
    }


def generate_study(out: Path, seed: int, options: PhantomOptions = PhantomOptions(),
                   write_tissue: bool = True) -> dict:
    """Write `out/dicom/<series>/*.dcm` and `out/truth/` (truth.json, one .npz per series)."""
    out = Path(out)
    d = design_study(seed, options)
    info = study_info(seed, options)
    truth = truth_document(d, info)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    for a in acquisitions(d, options):
        signals = signal_table(d.tissues.names, a.contrast, d.nucleus_t2)
        labels, tissue, clean = render_series(d.shapes, a.planes, signals)
        ref = float(signals[1:].max())
        pixels = quantise(degrade(clean, a.degradation, ref), a.degradation, ref)
        n = a.series.series_number
        write_mr_series(out / "dicom" / f"series_{n}", pixels, a.planes, info, a.series)
        arrays = {"labels": labels, "tissue": tissue} if write_tissue else {"labels": labels}
        np.savez_compressed(out / "truth" / f"series_{n}.npz", **arrays)
        entry = {"series_instance_uid": a.series.series_instance_uid, "series_number": n,
                 "description": a.series.description, "contrast": a.contrast.name,
                 "labels_file": f"series_{n}.npz", "label_values": LABEL_VALUES,
                 "acquisition": {**a.parameters, "tr_ms": a.contrast.tr, "te_ms": a.contrast.te, "ti_ms": a.contrast.ti,
                                 "field_t": a.contrast.field_t, **{k: v for k, v in asdict(a.degradation).items() if k != "seed"}}}
        if a.parameters["plane"] == "sagittal":
            entry["boxes"] = detector_boxes(labels)
        else:
            entry["disc_blocks"] = {name: [3 * i, 3 * i + 1, 3 * i + 2] for i, name in enumerate(LUMBAR_DISCS)}
        truth["series"].append(entry)
    (out / "truth" / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth
