"""docker/: Docker cannot run here, so the files are checked by reading them: hadolint on the
Dockerfile, and the compose file against the node's own configuration rules."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dicomnode.config import load_config
from tests.node_helpers import ROOT


def test_dockerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    r = subprocess.run([exe, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_node_and_worker_share_storage_and_configuration() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"orthanc", "redis", "node", "worker-gpu"} <= set(services)
    cfg = load_config(ROOT / "conf" / "docker.yaml")  # the file the image installs as /etc/dicomnode/node.yaml
    assert "conf/docker.yaml /etc/dicomnode/node.yaml" in (ROOT / "docker" / "Dockerfile").read_text()
    assert cfg.jobs.backend == "celery" and cfg.jobs.broker.startswith("redis://redis:")
    mounts = {name: [v for v in services[name]["volumes"] if v.startswith("storage:")] for name in ("node", "worker-gpu")}
    assert mounts["node"] == mounts["worker-gpu"] == [f"storage:{cfg.node.storage}"]
    assert services["worker-gpu"]["command"][0] == "worker"
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    orthanc = yaml.safe_load((ROOT / "docker" / "orthanc.json").read_text())
    assert orthanc["DicomModalities"]["dicomnode"] == [cfg.node.ae_title, "node", cfg.node.port]
    dest = cfg.destinations["pacs"]
    assert (dest.host, dest.port, dest.ae_title) == ("orthanc", orthanc["DicomPort"], orthanc["DicomAet"])
    assert "password" not in (ROOT / "conf" / "docker.yaml").read_text()  # the API token comes from the environment
