"""spine-seg on the GPU against the CPU, on the same series: does the node report the same thing,
and how much faster is the network? Needs a machine with CUDA; CI has none.

For the real cases held out of `--fold` (`../shared/data/real_lumbar`, or DICOMNODE_REAL_DIR) and
`--phantoms` held-out phantom studies (seeds 9000 and up, one contrast each): the largest
difference in class probability, the share of voxels whose class or named label differs, whether
the levels are named alike, Dice against the manual masks and both lordosis angles from each device;
then the network's time per series on each (median over the series, after a warm-up). The GPU
probabilities are compared twice: with PyTorch's default TF32 convolutions and in full float32.

Run: `.venv/bin/python bench/bench_devices.py [--fold 0] [--phantoms 6]`; prints Markdown and
writes bench/results/devices.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipelines.spine_seg import MODEL_DIR, Model, pick_series, segment  # noqa: E402
from training.evaluation.spine_seg import BODIES, DISCS, evaluate_study  # noqa: E402

PHANTOM_SEED = 9000


def studies(tmp: Path, fold: int, phantoms: int, case_ids: list[str] | None) -> list[Path]:
    """Study folders (DICOM + truth) of the real cases held out of `fold` (or `case_ids`, some of them) and phantoms."""
    from training.datasets.real_lumbar import case_to_dicom, load_cases, split
    from training.phantom.generator import PhantomOptions, generate_study

    cases = {c.case_id: c for c in load_cases()}
    folders = []
    for cid in case_ids or split(sorted(cases), fold)[1]:
        case_to_dicom(cases[cid], tmp / cid)
        folders.append(tmp / cid)
    for i in range(phantoms):
        contrast = ("T2", "T1", "STIR")[i % 3]
        folder = tmp / f"phantom-{PHANTOM_SEED + i}-{contrast}"
        generate_study(folder, PHANTOM_SEED + i, PhantomOptions(contrasts=(contrast,), max_matrix=512), write_tissue=False)
        folders.append(folder)
    return folders


def timed_probabilities(model: Model, series) -> tuple[np.ndarray, float]:
    t = time.perf_counter()
    p = model.probabilities(series)  # ends on the host, so the GPU's work is done when it returns
    return p, time.perf_counter() - t


def compare(folder: Path, cpu: Model, gpu: Model) -> dict:
    import torch

    series = pick_series(sorted((folder / "dicom").rglob("*.dcm")))
    p_cpu, t_cpu = timed_probabilities(cpu, series)
    p_gpu, t_gpu = timed_probabilities(gpu, series)
    torch.backends.cudnn.allow_tf32 = False
    p_fp32, _ = timed_probabilities(gpu, series)
    torch.backends.cudnn.allow_tf32 = True
    structures = BODIES + DISCS + (["canal"] if folder.name.startswith("phantom") else [])
    r_cpu, r_gpu = evaluate_study(folder, cpu, structures), evaluate_study(folder, gpu, structures)
    l_cpu, l_gpu = segment(series, cpu).labels, segment(series, gpu).labels  # cached by evaluate_study
    bodies = [n for n in ("L1", "L2", "L3", "L4", "L5") if n in r_cpu.dice]
    return {
        "series": folder.name, "voxels": int(l_cpu.size),
        "max_dp_tf32": float(np.abs(p_gpu - p_cpu).max()), "max_dp_fp32": float(np.abs(p_fp32 - p_cpu).max()),
        "class_differs": float((p_gpu.argmax(0) != p_cpu.argmax(0)).mean()),
        "label_differs": float((l_gpu != l_cpu).mean()),
        "named_cpu": r_cpu.named_ok, "named_gpu": r_gpu.named_ok,
        "body_dice_cpu": float(np.mean([r_cpu.dice[n] for n in bodies])) if bodies else None,
        "body_dice_gpu": float(np.mean([r_gpu.dice[n] for n in bodies])) if bodies else None,
        "angles_cpu": r_cpu.angles, "angles_gpu": r_gpu.angles, "t_cpu_s": t_cpu, "t_gpu_s": t_gpu,
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--phantoms", type=int, default=6)
    ap.add_argument("--cases", help="comma-separated real case ids, some of the fold's held-out ones (default: all of them)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_devices needs a CUDA GPU; this machine has none")
    cpu, gpu = Model(MODEL_DIR, "cpu"), Model(MODEL_DIR, "cuda")
    trained_on = set(cpu.description["training"].get("real_case_ids", []))
    with tempfile.TemporaryDirectory() as tmp:
        folders = studies(Path(tmp), args.fold, args.phantoms, args.cases.split(",") if args.cases else None)
        if trained_on & {f.name for f in folders}:
            sys.exit(f"real cases {sorted(trained_on & {f.name for f in folders})} trained the shipped model; use its held-out fold")
        compare(folders[0], cpu, gpu)  # warm-up: kernels, cuDNN's algorithm search, allocator
        rows = []
        for i, folder in enumerate(folders, 1):
            rows.append(compare(folder, cpu, gpu))
            print(f"[{i}/{len(folders)}] {folder.name}", flush=True)
    print(f"\n{date.today()}, {platform.machine()}, {torch.get_num_threads()} CPU threads, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; model {MODEL_DIR.name} {cpu.description['version']}\n")
    print("| series | max abs dp (TF32 / fp32) | class voxels differing | label voxels differing | named CPU / GPU "
          "| body Dice CPU / GPU | L1-L5 CPU / GPU | L1-S1 CPU / GPU | network s CPU / GPU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ang = {span: " / ".join(f"{a.get(span, float('nan')):.2f}" for a in (r["angles_cpu"], r["angles_gpu"]))
               for span in ("L1-L5", "L1-S1")}
        dice = "-" if r["body_dice_cpu"] is None else f"{r['body_dice_cpu']:.4f} / {r['body_dice_gpu']:.4f}"
        print(f"| {r['series']} | {r['max_dp_tf32']:.1e} / {r['max_dp_fp32']:.1e} | {r['class_differs']:.1e} "
              f"| {r['label_differs']:.1e} | {r['named_cpu']} / {r['named_gpu']} | {dice} | {ang['L1-L5']} | {ang['L1-S1']} "
              f"| {r['t_cpu_s']:.2f} / {r['t_gpu_s']:.3f} |")
    t_cpu, t_gpu = np.median([r["t_cpu_s"] for r in rows]), np.median([r["t_gpu_s"] for r in rows])
    worst = max((abs(r["angles_cpu"][s] - r["angles_gpu"][s]) for r in rows for s in r["angles_cpu"] if s in r["angles_gpu"]), default=0.0)
    print(f"\nNetwork time per series, median: CPU {t_cpu:.2f} s, GPU {t_gpu:.3f} s ({t_cpu / t_gpu:.0f}x). "
          f"Named alike in {sum(r['named_cpu'] == r['named_gpu'] for r in rows)}/{len(rows)}; "
          f"largest angle difference {worst:.2f} deg; largest share of label voxels differing "
          f"{max(r['label_differs'] for r in rows):.1e}.")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "devices.json").write_text(json.dumps({"date": str(date.today()), "gpu": torch.cuda.get_device_name(),
                                                      "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
