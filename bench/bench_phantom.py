"""Phantom generation speed (studies per minute) and peak memory, one process.

Run: `.venv/bin/python bench/bench_phantom.py [--studies 6]`; prints a Markdown table for
docs/BENCHMARKS.md and writes bench/results/phantom.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from training.phantom.generator import PhantomOptions, design_study, generate_study

CONFIGS = {
    "3 sagittal series (T2, T1, STIR), matrix up to 640": PhantomOptions(),
    "3 sagittal + axial T2": PhantomOptions(axial=True),
    "1 sagittal T2, matrix up to 384 (training data)": PhantomOptions(contrasts=("T2",), max_matrix=384),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=6)
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    for s in range(50):
        design_study(10_000 + s)
    design_s = (time.perf_counter() - t0) / 50
    rows.append(("design only (anatomy, pathology, truth grades)", design_s, 60 / design_s, 0))
    for name, opts in CONFIGS.items():
        times, files = [], 0
        with tempfile.TemporaryDirectory() as tmp:
            for s in range(args.studies):
                t = time.perf_counter()
                generate_study(Path(tmp) / str(s), 20_000 + s, opts)
                times.append(time.perf_counter() - t)
            files = sum(1 for _ in Path(tmp).rglob("*.dcm"))
        per = float(np.median(times))
        rows.append((name, per, 60 / per, files / args.studies))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{date.today()} on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.studies} studies per row; peak RSS {peak_mb:.0f} MB\n")
    print("| what | median s/study | studies/min | DICOM files/study |\n|---|---|---|---|")
    for name, per, rate, nfiles in rows:
        print(f"| {name} | {per:.2f} | {rate:.1f} | {nfiles:.0f} |")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "phantom.json").write_text(json.dumps({"date": str(date.today()), "cores": os.cpu_count(),
                                                  "peak_rss_mb": peak_mb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
