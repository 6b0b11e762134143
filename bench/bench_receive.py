"""Receive rate of `dicomnode serve` against DCMTK storescp and Orthanc, in the same run.

512x512 16-bit MR instances are sent by DCMTK storescu: one association, and eight at once.
Also: each receiver's CPU time per instance (on a machine with few cores the rate with eight
associations is bounded by it), associations per second (echoscu one after another), peak memory
of `serve` while receiving, and the delay from the last instance of a series to its job start
beyond the quiet period.
Run: `.venv/bin/python bench/bench_receive.py [--n 400]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.node_helpers import NodeProcess, Orthanc, bulk_instances, cpu_seconds, dcmtk, free_port, phantom_series, wait_for, wait_port  # noqa: E402


def make_instances(tmp: Path, n: int) -> list[Path]:
    ds = pydicom.dcmread(next(phantom_series(tmp).glob("*.dcm")))
    ds.Rows = ds.Columns = 512
    ds.PixelData = np.random.default_rng(0).integers(0, 4096, (512, 512), dtype=np.uint16).tobytes()
    template = tmp / "template.dcm"
    ds.save_as(template, enforce_file_format=True)
    return bulk_instances(template, tmp / "instances", n, series=8)


def send(port: int, aec: str, files: list[Path], parallel: int) -> float:
    chunks = [files[i::parallel] for i in range(parallel)]
    storescu = dcmtk("storescu")  # found before the clock starts
    t0 = time.perf_counter()
    procs = [subprocess.Popen([storescu, "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port), *map(str, c)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for c in chunks]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(p.stderr.read().decode())
    return time.perf_counter() - t0


def associations_per_second(port: int, aec: str, n: int = 50) -> float:
    """DCMTK echoscu `n` times, one association after another: what a sender that opens an
    association per instance meets (the client's own start-up included, the same for every receiver)."""
    echoscu = dcmtk("echoscu")  # found before the clock starts
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([echoscu, "-aet", "STORESCU", "-aec", aec, "127.0.0.1", str(port)], check=True)
    return n / (time.perf_counter() - t0)


OURS = "dicomnode serve (fsync + SQLite index)"
OURS_2 = "dicomnode serve, 2 receiver processes (`node.receivers: 2`)"


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (a node's receiver processes)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [q for c in children for q in process_tree(int(c))]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(pid: int, port: int, aec: str, files: list[Path], parallel: int) -> tuple[float, float]:
    """Instances per second, and the receiver's CPU milliseconds per instance (its whole process tree)."""
    pids = process_tree(pid)
    before = sum(map(cpu_seconds, pids))
    seconds = send(port, aec, files, parallel)
    return len(files) / seconds, 1000 * (sum(map(cpu_seconds, pids)) - before) / len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-receive-"))
    files = make_instances(tmp, args.n)
    rates: dict[str, dict[int, float]] = {}
    cpu: dict[str, dict[int, float]] = {}
    peaks: dict[int, float] = {}
    echoes: dict[str, float] = {}
    for parallel in (1, 8):
        for name, receivers in ((OURS, 1), (OURS_2, 2)):
            node = NodeProcess(tmp / f"node{parallel}-{receivers}", {"node": {"receivers": receivers}}).start()
            time.sleep(2 if receivers > 1 else 0)  # the receiver processes start
            rates.setdefault(name, {})[parallel], cpu.setdefault(name, {})[parallel] = measure(
                node.proc.pid, node.port, "DICOMNODE", files, parallel)
            if parallel == 1:
                echoes[name] = associations_per_second(node.port, "DICOMNODE")
            rss = sum(map(peak_rss_mb, process_tree(node.proc.pid)))
            peaks[receivers] = max(peaks.get(receivers, 0.0), rss)
            node.stop()
        out = tmp / f"storescp{parallel}"
        out.mkdir()
        port = free_port()
        scp = subprocess.Popen([dcmtk("storescp"), "-aet", "STORESCP", "-od", str(out), str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "TCP_NODELAY": "1"})
        wait_port(port)
        name = "DCMTK storescp (no fsync, no index)"
        rates.setdefault(name, {})[parallel], cpu.setdefault(name, {})[parallel] = measure(scp.pid, port, "STORESCP", files, parallel)
        if parallel == 1:
            echoes[name] = associations_per_second(port, "STORESCP")
        scp.terminate()
        scp.wait()
        orthanc = Orthanc(tmp / f"orthanc{parallel}", {}).start()
        name = "Orthanc (Debian package, SQLite)"
        rates.setdefault(name, {})[parallel], cpu.setdefault(name, {})[parallel] = measure(
            orthanc.proc.pid, orthanc.dicom_port, "ORTHANC", files, parallel)
        if parallel == 1:
            echoes[name] = associations_per_second(orthanc.dicom_port, "ORTHANC")
        orthanc.stop()

    # Delay from the last instance to the job start, beyond the quiet period.
    quiet = 1.0
    node = NodeProcess(tmp / "latency", {"assembly": {"series_quiet_seconds": quiet},
                                         "rules": [{"name": "all", "match": {}, "pipelines": ["derive"]}]}).start()
    series = sorted(phantom_series(tmp / "lat").glob("*.dcm"))
    delays = []
    for i in range(5):
        fresh = bulk_instances(series[0], tmp / f"lat{i}", 15)
        send(node.port, "DICOMNODE", fresh, 1)
        audit = node.storage / "audit.jsonl"
        wait_for(lambda: sum(1 for line in audit.read_text().splitlines() if '"started"' in line) > i, 30)
        events = [json.loads(x) for x in audit.read_text().splitlines()]
        last_received = max(e["time"] for e in events if e["event"] == "received")
        started = [e["time"] for e in events if e["event"] == "started"][i]
        delays.append(started - last_received - quiet)
    node.stop()

    print(f"{date.today()}, {platform.machine()}, {os.cpu_count()} cores; {args.n} instances of 512x512x16 bit MR, "
          "sent by DCMTK storescu over loopback\n")
    print("| receiver | 1 association (inst/s) | 8 at once (inst/s) | receiver CPU per instance, 1 / 8 (ms) |\n|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r[1]:.0f} | {r[8]:.0f} | {cpu[name][1]:.1f} / {cpu[name][8]:.1f} |")
    for name in (OURS, OURS_2):
        for ref in ("DCMTK storescp (no fsync, no index)", "Orthanc (Debian package, SQLite)"):
            print(f"\n{name} / {ref}: {rates[name][1] / rates[ref][1]:.2f} (1 association), "
                  f"{rates[name][8] / rates[ref][8]:.2f} (8 at once)")
    print("\nassociations per second, 50 DCMTK echoscu one after another: " +
          ", ".join(f"{name} {rate:.1f}" for name, rate in echoes.items()))
    print(f"\npeak RSS of `dicomnode serve` while receiving: {peaks[1]:.0f} MB; with 2 receivers, all its processes "
          f"together: {peaks[2]:.0f} MB")
    print(f"last instance -> job start, beyond the {quiet:.0f} s quiet period: median {1000 * np.median(delays):.0f} ms "
          f"(max {1000 * max(delays):.0f} ms, {len(delays)} series)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
