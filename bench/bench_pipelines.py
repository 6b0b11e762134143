"""spine-seg + lordosis on one 15-slice 512x512 sagittal T2 series: seconds from DICOM files to
SEG + SR written, after the model is loaded, and peak memory; on the CPU, and on the GPU when
there is one. Then `marrow` on a whole phantom study (sagittal T2, T1, STIR): files to SR and
Grad-CAM maps, spine-seg on each series included.

Run: `.venv/bin/python bench/bench_pipelines.py [--runs 5] [--device cpu|cuda]`; prints Markdown
rows for docs/BENCHMARKS.md and writes bench/results/pipelines-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from pipelines import lordosis, marrow, spine_seg
from structured_reports.model import ResultOptions
from training.phantom.acquisition import acquisitions
from training.phantom.generator import PhantomOptions, design_study, generate_study

OPTIONS = PhantomOptions(contrasts=("T2",), max_matrix=512)


def series_512x15(tmp: Path) -> list[Path]:
    """A phantom T2 sagittal series with a 512 matrix, trimmed to its central 15 slices."""
    seed = next(s for s in range(7000, 8000)
                if (p := acquisitions(design_study(s, OPTIONS), OPTIONS)[0].parameters)["matrix"] == 512 and p["slices"] >= 15)
    generate_study(tmp / "study", seed, OPTIONS, write_tissue=False)
    files = sorted((tmp / "study" / "dicom" / "series_1").glob("*.dcm"))
    start = (len(files) - 15) // 2
    (tmp / "in").mkdir()
    for f in files[start:start + 15]:
        shutil.copy(f, tmp / "in" / f.name)
    return sorted((tmp / "in").glob("*.dcm"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        files = series_512x15(tmp)
        t = time.perf_counter()
        model = spine_seg.load_model(device=args.device)
        load_s = time.perf_counter() - t
        times = []
        for run in range(args.runs + 1):  # the first run warms up (allocator, kernels) and is not counted
            spine_seg._cache.clear()
            out = tmp / f"out{run}"
            t = time.perf_counter()
            produced = spine_seg.run(files, out / "seg", ResultOptions()) + lordosis.run(files, out / "lordosis", ResultOptions())
            if run:
                times.append(time.perf_counter() - t)
        assert [p.name for p in produced] == ["seg.dcm", "sr.dcm"], produced
        generate_study(tmp / "three", 7000, PhantomOptions(contrasts=("T2", "T1", "STIR"), max_matrix=512), write_tissue=False)
        study = sorted((tmp / "three" / "dicom").rglob("*.dcm"))
        marrow.load_model()
        marrow_times = []
        for run in range(args.runs + 1):
            spine_seg._cache.clear()
            t = time.perf_counter()
            marrow.run(study, tmp / f"marrow{run}", ResultOptions())
            if run:
                marrow_times.append(time.perf_counter() - t)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = ""
    if model.device.type == "cuda":
        import torch

        gpu = f", {torch.cuda.get_device_name()} peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    row = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores{gpu}",
           "device": model.device.type, "model_load_s": round(load_s, 2), "median_s": round(float(np.median(times)), 2),
           "min_s": round(min(times), 2), "runs": len(times), "peak_rss_mb": round(peak_mb),
           "marrow_study_slices": len(study), "marrow_median_s": round(float(np.median(marrow_times)), 2),
           "marrow_min_s": round(min(marrow_times), 2)}
    print("| date | machine | device | model load s | files -> SEG + SR, median s (min) | peak RSS MB |\n|---|---|---|---|---|---|")
    print(f"| {row['date']} | {row['machine']} | {row['device']} | {row['model_load_s']} | {row['median_s']} ({row['min_s']}) "
          f"| {row['peak_rss_mb']} |")
    print(f"\nmarrow on a {row['marrow_study_slices']}-image study (T2, T1, STIR; spine-seg on each series): "
          f"median {row['marrow_median_s']} s (min {row['marrow_min_s']}); peak RSS above covers the whole run")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"pipelines-{row['device']}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
