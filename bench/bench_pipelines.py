"""spine-seg + lordosis on one 15-slice 512x512 sagittal T2 series: seconds from DICOM files to
SEG + SR written, after the model is loaded, and peak memory; on the CPU, and on the GPU when
there is one. Then, on a whole phantom study (sagittal T2, T1, STIR, axial T2), each study
pipeline alone (`marrow`, `disc-herniation`, `degeneration`: files to SR and Grad-CAM maps,
spine-seg included) and all five pipelines together as the node runs them for one rule
(`process`; spine-seg's result on a series is shared, as in the node).

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
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Callable

import numpy as np

# this checkout's code, not the editable install's (a worktree of an older commit is run this way)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicomnode.config import load_config  # noqa: E402
from dicomnode.process import process_folder  # noqa: E402
from pipelines import degeneration, herniation, lordosis, marrow, spine_seg  # noqa: E402
from structured_reports.model import ResultOptions  # noqa: E402
from training.phantom.acquisition import acquisitions  # noqa: E402
from training.phantom.generator import PhantomOptions, design_study, generate_study  # noqa: E402

OPTIONS = PhantomOptions(contrasts=("T2",), max_matrix=512)
ALL = ("spine-seg", "lordosis", "marrow", "disc-herniation", "degeneration")


def timed(work: Callable[[Path], object], out: Path, runs: int) -> list[float]:
    """Seconds of `work(folder)` over `runs` runs after one warm-up (allocator, kernels); spine-seg's kept result is
    dropped before each, so every run segments afresh."""
    times = []
    for run in range(runs + 1):
        spine_seg._cache.clear()
        t = time.perf_counter()
        work(out / str(run))
        if run:
            times.append(time.perf_counter() - t)
    return times


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
        produced: list[Path] = []

        def both(out: Path) -> None:
            produced[:] = spine_seg.run(files, out / "seg", ResultOptions()) + lordosis.run(files, out / "lordosis", ResultOptions())

        times = timed(both, tmp / "series", args.runs)
        assert [p.name for p in produced] == ["seg.dcm", "sr.dcm"], produced
        generate_study(tmp / "three", 7000, PhantomOptions(contrasts=("T2", "T1", "STIR"), axial=True, max_matrix=512),
                       write_tissue=False)
        study = sorted((tmp / "three" / "dicom").rglob("*.dcm"))
        pipelines = {"marrow": marrow, "disc-herniation": herniation, "degeneration": degeneration}
        for module in pipelines.values():
            module.load_model()
        study_times = {name: timed(lambda out, run=module.run: run(study, out, ResultOptions()), tmp / name, args.runs)
                       for name, module in pipelines.items()}
        cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "node.yaml")  # its lumbar rule, all pipelines
        cfg.rules[0].pipelines = list(ALL)
        study_times["all"] = timed(lambda out: process_folder(tmp / "three" / "dicom", out, cfg),
                                   tmp / "all", args.runs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = ""
    if model.device.type == "cuda":
        import torch

        gpu = f", {torch.cuda.get_device_name()} peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    row = {"date": str(date.today()), "machine": f"{platform.machine()}, {os.cpu_count()} cores{gpu}",
           "device": model.device.type, "model_load_s": round(load_s, 2), "median_s": round(float(np.median(times)), 2),
           "min_s": round(min(times), 2), "runs": len(times), "peak_rss_mb": round(peak_mb),
           "study_images": len(study),
           **{f"{name}_median_s": round(float(np.median(t)), 2) for name, t in study_times.items()},
           **{f"{name}_min_s": round(min(t), 2) for name, t in study_times.items()}}
    print("| date | machine | device | model load s | files -> SEG + SR, median s (min) | peak RSS MB |\n|---|---|---|---|---|---|")
    print(f"| {row['date']} | {row['machine']} | {row['device']} | {row['model_load_s']} | {row['median_s']} ({row['min_s']}) "
          f"| {row['peak_rss_mb']} |")
    print(f"\nOn a {row['study_images']}-image study (sagittal T2, T1, STIR, axial T2), files to result objects, median s (min):")
    for name in study_times:
        print(f"- {name if name != 'all' else ' + '.join(ALL) + ' (one rule, as the node runs them)'}: "
              f"{row[f'{name}_median_s']} ({row[f'{name}_min_s']})")
    print("Peak RSS above covers the whole run.")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / f"pipelines-{row['device']}.json").write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
