"""`dicomnode demo`: the main job on embedded defaults. A synthetic lumbar MR study is generated,
sent by C-STORE to a node started here (SQLite storage, shipped weights, the lumbar rule), and
the SEG and SR that come out are read back, compared with the phantom's truth and drawn."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pydicom

from dicomnode.config import LUMBAR_RULE, parse_config
from dicomnode.node import Node
from dicomnode.scu import Peer, store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(out: Path, seed: int, timeout: float = 600) -> dict:
    from structured_reports.render import render_result, seg_source_uids
    from training.phantom.generator import PhantomOptions, generate_study
    from training.phantom.preview import study_preview

    t0 = time.perf_counter()
    truth = generate_study(out / "study", seed, PhantomOptions(axial=True))
    files = sorted((out / "study" / "dicom").rglob("*.dcm"))
    print(f"  {len(files)} DICOM files in {len(truth['series'])} series ({time.perf_counter() - t0:.1f} s)")
    for s in truth["series"]:
        a = s["acquisition"]
        print(f"    {s['description']:8s} {a['matrix']}x{a['matrix']}, {a['slices']} slices, "
              f"{a['pixel_spacing_mm']:.2f} mm pixels, {a['slice_thickness_mm']:.1f} mm thick")
    print(f"  truth: class {truth['study_class']}, lordosis L1-S1 {truth['lordosis_deg']['L1-S1']:.1f} deg "
          f"({truth['lordosis_class']}), L1-L5 {truth['lordosis_deg']['L1-L5']:.1f} deg")
    print(f"  preview: {study_preview(out / 'study', out / 'preview.png')}")

    cfg = parse_config({"node": {"port": _free_port(), "storage": str(out / "var")},
                        "assembly": {"series_quiet_seconds": 1, "study_quiet_seconds": 2},
                        "api": {"enabled": False},
                        "rules": [{**LUMBAR_RULE, "send_to": []}]}, "demo defaults")
    node = Node(cfg).start()
    try:
        t1 = time.perf_counter()
        n = store(Peer(cfg.node.ae_title, cfg.node.host, cfg.node.port), files, "DEMO")
        print(f"  sent {n} instances to the node on port {cfg.node.port} by C-STORE ({time.perf_counter() - t1:.1f} s); "
              f"waiting for the study to complete and the pipelines to run")
        end = time.time() + timeout
        while time.time() < end:
            jobs = node.jobs.list()
            if jobs and all(j.state in ("done", "dead") for j in jobs):
                break
            time.sleep(0.5)
        jobs = node.jobs.list()
    finally:
        node.stop()
    summary: dict = {"jobs": {j.pipeline: j.state for j in jobs}, "truth": truth["lordosis_deg"]}
    for j in jobs:
        print(f"  job {j.id} {j.pipeline}: {j.state}" + (f" ({j.last_error})" if j.last_error else ""))
    results = out / "var" / "results"
    seg_files, sr_files = sorted(results.rglob("seg.dcm")), sorted(results.rglob("sr.dcm"))
    findings = [json.loads(p.read_text()) for p in sorted(results.rglob("findings.json"))]
    for f in findings:
        for name, v in f.items():
            if v.get("problems"):
                print(f"  {name}: " + "; ".join(v["problems"]))
    if seg_files and sr_files:
        seg, sr = pydicom.dcmread(seg_files[0]), pydicom.dcmread(sr_files[0])
        refs = seg_source_uids(seg)
        folder = next(p.parent for p in (out / "var" / "instances").rglob("*.dcm") if p.stem in refs)
        sources = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
        png, segments, report = render_result(seg, sr, sources, out / "result.png", f"dicomnode demo, seed {seed}")
        print(f"  SEG: {seg_files[0]} ({len(segments)} segments: {', '.join(s.structure for s in segments)})")
        print(f"  SR:  {sr_files[0]}")
        for a in report.angles:
            print(f"    lordosis {a.span}: {a.degrees:.1f} deg (truth {truth['lordosis_deg'][a.span]:.1f})"
                  + (f", interquartile range {a.spread_deg:.1f} deg over the central slices" if a.spread_deg is not None else "")
                  + (f", {a.category}" if a.category else "") + (", flagged uncertain: check its lines" if a.uncertain else ""))
        for span in report.unmeasured:
            print(f"    lordosis {span}: not measured (in the SR as \"Measurement failure\")")
        print(f"  result: {png}")
        summary.update({"seg": str(seg_files[0]), "sr": str(sr_files[0]), "angles": {a.span: a.degrees for a in report.angles},
                        "result_png": str(png)})
    return summary

