"""`docs/phantom.md`: the phantom beside the real cases, intensity ratios, parameter ranges.

Run: `python -m training.phantom.report --docs docs` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dicomnode.config import lordosis_class  # noqa: E402
from training.datasets.real_lumbar import DEFAULT_DIR, RealCase, load_case  # noqa: E402
from training.phantom.acquisition import acquisitions  # noqa: E402
from training.phantom.anatomy import LABEL_VALUES, LUMBAR_DISCS, LUMBAR_VERTEBRAE  # noqa: E402
from training.phantom.generator import PhantomOptions, design_study, generate_study  # noqa: E402
from training.phantom.preview import mid_sagittal, read_series  # noqa: E402

BODIES = [LABEL_VALUES[k] for k in LUMBAR_VERTEBRAE]
DISCS = [LABEL_VALUES[k] for k in LUMBAR_DISCS]
REAL_EXAMPLES = ["VB1_02", "VB1_10", "VB3_01", "VB3_20", "IVD_11", "IVD_42"]


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1, 99.5])
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def phantom_ratios(study: Path) -> dict[str, dict[str, float]]:
    """Per contrast: disc/vertebra, CSF/cauda and fat/muscle mean intensity ratios."""
    truth = json.loads((study / "truth" / "truth.json").read_text())
    names = truth["tissues"]
    out = {}
    for s in truth["series"]:
        if not s["description"].startswith("SAG"):
            continue
        vol, _ = read_series(study / "dicom" / f"series_{s['series_number']}")
        z = np.load(study / "truth" / s["labels_file"])
        lab, tis = z["labels"], z["tissue"]
        mean = lambda m: float(vol[m].mean())  # noqa: E731
        out[s["contrast"]] = {
            "disc/vertebra": mean(np.isin(lab, DISCS)) / mean(np.isin(lab, BODIES)),
            "csf/cord": mean(tis == names.index("csf")) / mean(tis == names.index("nerve")),
            "fat/muscle": mean(tis == names.index("fat")) / mean(tis == names.index("muscle")),
        }
    return out


def real_disc_vertebra_ratio(case: RealCase) -> float:
    """Disc/vertebra intensity on a real case labelled for only one of the two: the unlabelled one
    is taken as the gap between consecutive labelled structures, column by column (1 px margin)."""
    k = int(np.argmax((case.labels > 0).sum(axis=(0, 1))))
    img, lab = case.image[:, :, k].astype(float), case.labels[:, :, k]
    gap = np.zeros_like(lab, dtype=bool)
    for a in range(1, len(case.names)):
        upper, lower = lab == a, lab == a + 1
        for c in np.nonzero(upper.any(axis=0) & lower.any(axis=0))[0]:
            top = np.nonzero(upper[:, c])[0].max() + 2
            bottom = np.nonzero(lower[:, c])[0].min() - 1
            if bottom > top:
                gap[top:bottom, c] = True
    labelled = float(img[lab > 0].mean())
    between = float(img[gap].mean()) if gap.any() else float("nan")
    return between / labelled if case.kind == "vertebral_body" else labelled / between


def montage(studies: list[Path], out_png: Path) -> None:
    fig, axes = plt.subplots(2, 6, figsize=(18, 7))
    for j, study in enumerate(studies[:2]):
        truth = json.loads((study / "truth" / "truth.json").read_text())
        for i, s in enumerate(t for t in truth["series"] if t["description"].startswith("SAG")):
            img, _ = mid_sagittal(study, s)
            ax = axes[0, 3 * j + i]
            ax.imshow(_window(img), cmap="gray")
            ax.set_title(f"phantom seed {truth['seed']}: {s['description']}", fontsize=9)
    for ax, cid in zip(axes[1], REAL_EXAMPLES):
        case = load_case(DEFAULT_DIR / f"{cid}.npz")
        k = int(np.argmax((case.labels > 0).sum(axis=(0, 1))))
        ax.imshow(_window(case.image[:, :, k].astype(float)), cmap="gray", aspect=case.spacing_mm[0] / case.spacing_mm[1])
        ax.set_title(f"real {cid}: {case.sequence[:28]}", fontsize=9)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)


def _design_row(seed: int) -> dict:
    d = design_study(seed)
    acq = acquisitions(d, PhantomOptions(axial=True))
    sag = [a for a in acq if a.parameters["plane"] == "sagittal"]
    return {"seed": seed, "class": d.study_class, "lordosis": d.lordosis, "params": d.params,
            "levels": d.levels, "acq": [{**a.parameters, "noise": a.degradation.noise, "bias": a.degradation.bias,
                                        "blur": a.degradation.blur_px, "bits": a.degradation.bits,
                                        "field": a.contrast.field_t} for a in sag]}


def parameter_ranges(n: int, workers: int = 2) -> tuple[list[tuple[str, float, float, float]], dict[str, Counter]]:
    with ProcessPoolExecutor(workers) as pool:
        rows = list(tqdm(pool.map(_design_row, range(n), chunksize=8), total=n, desc="designs", unit="study"))
    num: dict[str, list[float]] = {}
    add = lambda k, v: num.setdefault(k, []).append(float(v))  # noqa: E731
    counts: dict[str, Counter] = {k: Counter() for k in ("study class", "herniation", "spinal_canal_stenosis",
                                                         "left_neural_foraminal_narrowing", "left_subarticular_stenosis",
                                                         "disc_degeneration", "marrow", "lordosis class")}
    for r in rows:
        add("lordosis L1-S1 (deg)", r["lordosis"]["L1-S1"])
        add("lordosis L1-L5 (deg)", r["lordosis"]["L1-L5"])
        add("sacral slope (deg)", r["params"].sacral_slope_deg)
        add("anatomy size factor", r["params"].size)
        add("canal AP diameter (mm)", 2 * r["params"].canal_ap_radius)
        counts["study class"][r["class"]] += 1
        counts["lordosis class"][lordosis_class(r["lordosis"]["L1-S1"])] += 1
        for lv, v in r["levels"].items():
            for k in counts:
                if k in v:
                    counts[k][v[k]] += 1
            if "spondylolisthesis_pct" in v and v["spondylolisthesis_pct"] > 0:
                add("spondylolisthesis where present (%)", v["spondylolisthesis_pct"])
            if v.get("herniation_depth_mm", 0) > 0:
                add("herniation depth where present (mm)", v["herniation_depth_mm"])
            if v.get("canal_narrowing_pct", 0) > 0:
                add("canal narrowing where present (%)", v["canal_narrowing_pct"])
        for q in r["acq"]:
            add("sagittal matrix", q["matrix"])
            add("in-plane spacing (mm)", q["pixel_spacing_mm"])
            add("slice thickness (mm)", q["slice_thickness_mm"])
            add("gap (mm)", q["gap_mm"])
            add("sagittal slices", q["slices"])
            add("slice normal tilt (deg)", q["rotation_deg"][0])
            add("in-plane rotation (deg)", q["rotation_deg"][1])
            add("Rician noise (fraction of brightest tissue)", q["noise"])
            add("bias field amplitude", q["bias"])
            add("blur (pixels)", q["blur"])
            add("bits stored", q["bits"])
            add("field strength (T)", q["field"])
    table = [(k, float(np.min(v)), float(np.median(v)), float(np.max(v))) for k, v in num.items()]
    return table, counts


def write_report(docs: Path, n_designs: int = 1000, n_rendered: int = 8) -> Path:
    img_dir = docs / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="phantom-report-"))
    studies = []
    for seed in tqdm(range(n_rendered), desc="rendering studies", unit="study"):
        generate_study(tmp / str(seed), seed, PhantomOptions(max_matrix=448))
        studies.append(tmp / str(seed))
    montage(studies, img_dir / "phantom_vs_real.png")
    ratios: dict[str, dict[str, list[float]]] = {}
    for s in studies:
        for contrast, r in phantom_ratios(s).items():
            for k, v in r.items():
                ratios.setdefault(contrast, {}).setdefault(k, []).append(v)
    real: dict[str, list[float]] = {}
    for cid in sorted(p.stem for p in DEFAULT_DIR.glob("*.npz")):
        c = load_case(DEFAULT_DIR / f"{cid}.npz")
        real.setdefault(f"{c.dataset} ({c.sequence})", []).append(real_disc_vertebra_ratio(c))
    table, counts = parameter_ranges(n_designs)

    lines = ["# The synthetic lumbar MR phantom", "",
             "Regenerate this page with `python -m training.phantom.report --docs docs`.", "",
             "## Phantom beside real scans", "",
             "Top: mid-sagittal T2, T1 and STIR of two phantom studies. Bottom: mid-sagittal slices of real cases",
             "from `shared/data/real_lumbar` (VB1 mixed clinical, VB3 water-fat 3 T, IVD T2 1.5 T).", "",
             "![phantom and real](images/phantom_vs_real.png)", "",
             f"## Intensity ratios (mean ± sd over {n_rendered} phantom studies)", "",
             "| contrast | disc / vertebra | CSF / cauda | fat / muscle |", "|---|---|---|---|"]
    for contrast in ("T1", "T2", "STIR"):
        r = ratios.get(contrast, {})
        cell = lambda k: f"{np.mean(r[k]):.2f} ± {np.std(r[k]):.2f}" if k in r else "n/a"  # noqa: E731
        lines.append(f"| phantom {contrast} | {cell('disc/vertebra')} | {cell('csf/cord')} | {cell('fat/muscle')} |")
    for k, v in real.items():
        v = [x for x in v if np.isfinite(x)]
        lines.append(f"| real {k}, n={len(v)} | {np.mean(v):.2f} ± {np.std(v):.2f} | no label | no label |")
    lines += ["", "Real disc/vertebra ratios use the labelled structure and the gap between consecutive labelled",
              "structures (the unlabelled one); CSF, cord, fat and muscle carry no labels in the real cases.", "",
              f"## Parameter ranges over {n_designs} studies (seeds 0-{n_designs - 1})", "",
              "Drawn by the same functions `dicomnode phantom` uses (design and acquisition, without rendering).", "",
              "| parameter | min | median | max |", "|---|---|---|---|"]
    lines += [f"| {k} | {lo:.3g} | {med:.3g} | {hi:.3g} |" for k, lo, med, hi in table]
    lines += ["", "## Label frequencies", "", "Per study (class) or per level (lumbar discs L1/L2-L5/S1, vertebrae L1-S1).", ""]
    for k, c in counts.items():
        lines.append(f"- **{k}**: " + ", ".join(f"{name} {n}" for name, n in sorted(c.items(), key=lambda x: -x[1])))
    out = docs / "phantom.md"
    existing = out.read_text() if out.exists() else ""
    marker = "<!-- generated above, written by hand below -->"
    tail = existing.split(marker, 1)[1] if marker in existing else "\n"
    out.write_text("\n".join(lines) + f"\n\n{marker}" + tail)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--designs", type=int, default=1000)
    ap.add_argument("--rendered", type=int, default=8)
    a = ap.parse_args()
    print(write_report(Path(a.docs), a.designs, a.rendered))
