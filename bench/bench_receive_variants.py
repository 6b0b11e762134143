"""Why eight associations at once receive no faster than one: the node under variations, same run.

Each variation changes one thing in `dicomnode serve` (its configuration, or by a wrapper what the
product does not offer) and measures 400 instances of 512x512 16-bit MR sent by DCMTK storescu, one association and eight:

- baseline: the node as shipped;
- two and three receiver processes on one port (`node.receivers`; the main process passes each
  new association to the process with the fewest open ones): if the interpreter lock is the
  limit, this scales;
- no fsync: if durability were the limit, this rises;
- 16 KiB PDUs: what a small maximum PDU costs (the node offers an unlimited one);
- contexts deep-copied per association: pynetdicom's own copy of the listener's presentation
  contexts, which the node replaced by one that shares the UIDs; also measured as associations
  per second (DCMTK echoscu, one after another).

Also the node's CPU use and the machine's idle share during each run. Run:
`.venv/bin/python bench/bench_receive_variants.py [--n 400]`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.bench_receive import make_instances, process_tree, send  # noqa: E402
from tests.node_helpers import cpu_seconds, dcmtk, dicomnode_env, free_port, wait_port  # noqa: E402

WRAPPER = """
import os, sys
if os.environ.get("BENCH_NO_FSYNC"):
    os.fsync = lambda fd: None
if os.environ.get("BENCH_DEEP_COPY"):  # the contexts copied as pynetdicom does by itself (before 2026-12-01)
    import copy
    from dicomnode.scp import SharedUIDContexts
    SharedUIDContexts.__deepcopy__ = lambda self, memo: copy.deepcopy(list(self), memo)
from dicomnode.cli import main
sys.exit(main(sys.argv[1:]))
"""

VARIANTS = {  # name: (extra environment, node section overrides)
    "baseline (as shipped: one receiver process)": ({}, {}),
    "contexts deep-copied per association (as before 2026-12-01)": ({"BENCH_DEEP_COPY": "1"}, {}),
    "two receiver processes, one port (receivers: 2)": ({}, {"receivers": 2}),
    "three receiver processes (receivers: 3)": ({}, {"receivers": 3}),
    "no fsync": ({"BENCH_NO_FSYNC": "1"}, {}),
    "max PDU 16 KiB": ({}, {"max_pdu": 16384}),
}


def idle_seconds() -> float:
    return int(Path("/proc/stat").read_text().split()[4]) / os.sysconf("SC_CLK_TCK")


def start_node(tmp: Path, env: dict, node: dict) -> tuple[subprocess.Popen, int]:
    """`dicomnode serve` under the wrapper with one variation; (process, port) once it listens."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(dir=tmp))
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"port": port, "host": "127.0.0.1", "storage": str(folder / "var"), **node},
                                      "rules": [], "api": {"enabled": False}}))
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "serve", "--config", str(config)],
                            env=dicomnode_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc=proc)
    time.sleep(2)
    return proc, port


def run(tmp: Path, files: list[Path], env: dict, node: dict, parallel: int) -> tuple[float, float, float]:
    """(instances/s, node CPU in % of one core, machine idle in %) for one variation."""
    proc, port = start_node(tmp, env, node)
    pids = process_tree(proc.pid)
    cpu0, idle0, t0 = sum(map(cpu_seconds, pids)), idle_seconds(), time.time()
    seconds = send(port, "DICOMNODE", files, parallel)
    wall = time.time() - t0
    cpu = (sum(map(cpu_seconds, pids)) - cpu0) / wall
    idle = (idle_seconds() - idle0) / wall / os.cpu_count()
    proc.terminate()
    proc.wait()
    return len(files) / seconds, 100 * cpu, 100 * idle


def associations_per_second(tmp: Path, env: dict, n: int = 100) -> float:
    """DCMTK echoscu `n` times, one association after another: what setting up an association costs."""
    proc, port = start_node(tmp, env, {})
    echoscu = dcmtk("echoscu")  # found before the clock starts
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([echoscu, "-aec", "DICOMNODE", "127.0.0.1", str(port)], check=True)
    rate = n / (time.perf_counter() - t0)
    proc.terminate()
    proc.wait()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=400)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-variants-"))
    files = make_instances(tmp, args.n)
    print(f"{date.today()}, {os.uname().machine}, {os.cpu_count()} cores; {args.n} instances of 512x512x16 bit MR, DCMTK storescu\n")
    print("| variation | 1 association inst/s (node CPU %, idle %) | 8 at once inst/s (node CPU %, idle %) |\n|---|---|---|")
    for name, (env, node) in VARIANTS.items():
        cells = [run(tmp, files, env, node, parallel) for parallel in (1, 8)]
        print(f"| {name} | " + " | ".join(f"{r:.0f} ({c:.0f}, {i:.0f})" for r, c, i in cells) + " |", flush=True)
    print("\nassociations/s, 100 DCMTK echoscu one after another (twice each, alternating):")
    for _ in range(2):
        for name in ("baseline (as shipped: one receiver process)", "contexts deep-copied per association (as before 2026-12-01)"):
            print(f"  {name}: {associations_per_second(tmp, VARIANTS[name][0]):.1f}", flush=True)


if __name__ == "__main__":
    main()
