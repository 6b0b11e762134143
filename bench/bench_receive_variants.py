"""Why eight associations at once receive no faster than one: the node under variations, same run.

Each variation changes one thing in `dicomnode serve` (its configuration, or by a wrapper what the
product does not offer) and measures 400 instances of 512x512 16-bit MR sent by DCMTK storescu, one association and eight:

- baseline: the node as shipped;
- two and three receiver processes on one port (`node.receivers`; SO_REUSEPORT, the kernel
  spreads the associations by a hash of their addresses, not evenly): if the interpreter lock
  is the limit, this scales;
- no fsync: if durability were the limit, this rises;
- 16 KiB PDUs: what a small maximum PDU costs (the node offers an unlimited one);
- contexts deep-copied per association: pynetdicom's own copy of the listener's presentation
  contexts, which the node replaced by one that shares the UIDs.

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
from tests.node_helpers import dicomnode_env, free_port, wait_port  # noqa: E402

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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def idle_seconds() -> float:
    return int(Path("/proc/stat").read_text().split()[4]) / os.sysconf("SC_CLK_TCK")


def run(tmp: Path, files: list[Path], env: dict, node: dict, parallel: int) -> tuple[float, float, float]:
    """(instances/s, node CPU in % of one core, machine idle in %) for one variation."""
    port = free_port()
    folder = Path(tempfile.mkdtemp(dir=tmp))
    config = folder / "node.yaml"
    config.write_text(yaml.safe_dump({"node": {"port": port, "host": "127.0.0.1", "storage": str(folder / "var"), **node},
                                      "rules": [], "api": {"enabled": False}}))
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, "serve", "--config", str(config)],
                            env=dicomnode_env(**env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc=proc)
    time.sleep(2)
    pids = process_tree(proc.pid)
    cpu0, idle0, t0 = sum(map(cpu_seconds, pids)), idle_seconds(), time.time()
    seconds = send(port, "DICOMNODE", files, parallel)
    wall = time.time() - t0
    cpu = (sum(map(cpu_seconds, pids)) - cpu0) / wall
    idle = (idle_seconds() - idle0) / wall / os.cpu_count()
    proc.terminate()
    proc.wait()
    return len(files) / seconds, 100 * cpu, 100 * idle


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


if __name__ == "__main__":
    main()
