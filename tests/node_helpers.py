"""Real servers on loopback for the node tests: the node itself (a `dicomnode serve` process),
Orthanc, and instances to send. Ports are chosen per test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import pydicom
import requests
import yaml
from pydicom.uid import generate_uid
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import MRImageStorage

from training.phantom.generator import PhantomOptions, generate_study

ROOT = Path(__file__).resolve().parents[1]


def dicomnode_cmd() -> list[str]:
    """The command line of this checkout's `dicomnode` (the shared venv's entry point may belong to
    another clone); run with PYTHONPATH at the repository root, as `dicomnode_env` sets."""
    return [sys.executable, "-m", "dicomnode.cli"]


def dcmtk(tool: str) -> str:
    """DCMTK's `tool` by absolute path. With the venv activated its bin comes first on PATH, and
    pynetdicom's console scripts there (`storescu`, `echoscu`) take DCMTK's names but not its options."""
    venv_bin = (Path(sys.prefix) / "bin").resolve()
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d).resolve() != venv_bin)
    exe = shutil.which(tool, path=path)
    if exe is None:
        raise FileNotFoundError(f"DCMTK's {tool} is not installed: apt install dcmtk (scripts/setup.sh does)")
    return exe


def dicomnode_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", **extra}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 once it has exited)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, what: str = "condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached after {timeout} s")


def raw_c_store(assoc, sop_instance_uid: str, payload: bytes, msg_id: int, sop_class_uid: str = MRImageStorage) -> int:
    """Send a C-STORE on the MR Image Storage context whose dataset bytes are given as they are (to
    send what SCUs would refuse); `sop_class_uid` is the SOP class its command names. Returns the status."""
    req = C_STORE()
    req.MessageID = msg_id
    req.AffectedSOPClassUID = sop_class_uid
    req.AffectedSOPInstanceUID = sop_instance_uid
    req.Priority = 2
    req.DataSet = BytesIO(payload)
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == MRImageStorage)
    assoc._reactor_checkpoint.clear()  # pause the reactor as pynetdicom's own send_c_store does
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, cx.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return int(rsp.Status)


class NodeProcess:
    """`dicomnode serve` in its own process, with a configuration written for the test."""

    def __init__(self, tmp: Path, config: dict, env: dict | None = None):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        config = json.loads(json.dumps(config))
        self.port = config.setdefault("node", {}).get("port") or free_port()
        config["node"].update({"port": self.port, "host": "127.0.0.1"})
        config["node"].setdefault("storage", str(tmp / "var"))
        config.setdefault("plugins", []).append("tests.plugins.pipelines_for_tests")
        api = config.setdefault("api", {})
        api.setdefault("port", free_port())
        self.api_url = f"{'https' if api.get('certfile') else 'http'}://127.0.0.1:{api['port']}"
        self.storage = Path(config["node"]["storage"])
        self.config_path = tmp / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = dicomnode_env(**(env or {}))
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "node.log"

    def command(self) -> list[str]:
        return [*dicomnode_cmd(), "serve", "--config", str(self.config_path)]

    def start(self) -> "NodeProcess":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=self._logf, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_receivers_ready(self) -> None:
        """Until a receiver process (`node.receivers` > 1) takes the connections the node passes over."""
        wait_for(lambda: "receiving associations that the node" in self.log_text(), 30, what="the receiver ready")


class Orthanc:
    """A real Orthanc (Debian package) on loopback ports, with its own storage."""

    def __init__(self, tmp: Path, modalities: dict[str, list]):
        self.tmp = tmp
        tmp.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        cfg = {"Name": "test", "StorageDirectory": str(tmp / "db"), "IndexDirectory": str(tmp / "db"),
               "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
               "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomModalities": modalities,
               "DicomCheckCalledAet": False, "StableAge": 1, "Plugins": [], "HttpsCACertificates": ""}
        (tmp / "orthanc.json").write_text(json.dumps(cfg))
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Orthanc":
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self._logf = open(self.tmp / "orthanc.log", "ab")
        self.proc = subprocess.Popen([exe, str(self.tmp / "orthanc.json")], env={**os.environ, "TCP_NODELAY": "1"},
                                     stdout=self._logf, stderr=subprocess.STDOUT)
        wait_port(self.http_port, proc=self.proc)
        wait_port(self.dicom_port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)

    def get(self, path: str):
        r = requests.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def get_bytes(self, path: str) -> bytes:
        r = requests.get(self.url + path, timeout=30)
        r.raise_for_status()
        return r.content

    def post(self, path: str, data):
        r = requests.post(self.url + path, data=data if isinstance(data, bytes) else json.dumps(data), timeout=60)
        r.raise_for_status()
        return r.json()


class RedisServer:
    """A real redis-server (Debian package) on a loopback port, nothing saved to disk."""

    def __init__(self, tmp: Path):
        self.tmp, self.port = tmp, free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                      "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class WorkerProcess:
    """`dicomnode worker` in its own process group (so a test can kill it and its children at once)."""

    def __init__(self, node: NodeProcess, name: str, *args: str):
        self.node, self.name, self.args = node, name, args
        self.log = node.tmp / f"worker-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen([*dicomnode_cmd(), "worker", "--config", str(self.node.config_path), "--name", f"{self.name}@test",
                                      *self.args],
                                     cwd=ROOT, env=self.node.env, stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: "ready." in self.log.read_text(errors="replace"), 60, what=f"worker {self.name} ready")
        return self

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def phantom_series(tmp: Path, seed: int = 11) -> Path:
    """One small phantom study (sagittal T2 only) as DICOM files; returns the series folder."""
    generate_study(tmp / "study", seed, PhantomOptions(contrasts=("T2",), max_matrix=256))
    return tmp / "study" / "dicom" / "series_1"


def bulk_instances(template: Path, out: Path, n: int, series: int = 1) -> list[Path]:
    """`n` distinct instances made from one file: new SOP, series and study UIDs."""
    out.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(template)
    study = generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    paths = []
    for i in range(n):
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series_uids[i % series]
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"{i:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
