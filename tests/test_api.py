"""The REST API of a running `dicomnode serve`, with real peers: DCMTK storescu, Orthanc, schemathesis."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest
import requests
import yaml

from tests.node_helpers import ROOT, NodeProcess, Orthanc, free_port, phantom_series, wait_for
from tests.test_node import storescu

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PATIENT = "DOE^JANE"


def start(tmp_path: Path, cfg: dict) -> NodeProcess:
    return NodeProcess(tmp_path, cfg, env={"DICOMNODE_API_TOKEN": TOKEN}).start()


def get(node: NodeProcess, path: str, **kw) -> requests.Response:
    return requests.get(node.api_url + path, timeout=30, **kw)


def call(node: NodeProcess, method: str, path: str, json=None, headers=AUTH) -> requests.Response:
    return requests.request(method, node.api_url + path, json=json, headers=headers, timeout=30)


def named_series(tmp_path: Path, seed: int) -> Path:
    """A phantom series whose instances carry a recognisable patient name (it must never leak)."""
    series = phantom_series(tmp_path / f"s{seed}", seed=seed)
    for p in series.glob("*.dcm"):
        ds = pydicom.dcmread(p)
        ds.PatientName = PATIENT
        ds.save_as(p)
    return series


def test_reads_follow_orthanc_and_need_a_token_except_from_localhost(tmp_path: Path) -> None:
    node = start(tmp_path, {"assembly": {"series_quiet_seconds": 0.5}})
    try:
        series = named_series(tmp_path, 40)
        assert storescu(node.port, series).returncode == 0
        files = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in series.glob("*.dcm")}
        stats = get(node, "/statistics").json()
        assert (stats["CountInstances"], stats["CountSeries"], stats["CountStudies"]) == (len(files), 1, 1)
        study = get(node, "/studies").json()[0]
        assert study["CountInstances"] == len(files)
        detail = get(node, f"/studies/{study['ID']}").json()
        assert detail["Series"][0]["MainDicomTags"]["Modality"] == "MR"
        listed = get(node, f"/series/{detail['Series'][0]['ID']}").json()["Instances"]
        assert sorted(listed) == sorted(files)
        uid = listed[0]
        r = get(node, f"/instances/{uid}/file")
        assert r.headers["content-type"] == "application/dicom"
        assert pydicom.dcmread(pydicom.filebase.DicomBytesIO(r.content)).PixelData == pydicom.dcmread(files[uid]).PixelData
        lookup = requests.post(node.api_url + "/tools/lookup", data=uid, timeout=10).json()
        assert lookup == [{"ID": uid, "Type": "Instance", "Path": f"/instances/{uid}/file"}]
        assert requests.post(node.api_url + "/tools/lookup", data=study["ID"], timeout=10).json()[0]["Type"] == "Study"
        assert len(get(node, "/tools/now").text) == 15
        # Not found, not a UID (a path), no token for a write, a wrong token for a read.
        assert get(node, "/studies/1.2.3").status_code == 404
        assert get(node, "/instances/..%2F..%2Fetc/file").status_code in (404, 422)
        r = call(node, "DELETE", "/rules/x", headers={})
        assert r.status_code == 401 and "Bearer" in r.json()["detail"]
        assert get(node, "/system", headers={"Authorization": "Bearer wrong-token-000000"}).status_code == 401
        assert get(node, "/health").json()["status"] == "ok"
        # No patient data in what the API reports about the work.
        metrics = get(node, "/metrics").text
        assert 'dicomnode_c_store_total{status="success"} ' + str(len(files)) in metrics
        changes = get(node, "/changes?limit=5").json()
        assert len(changes["Changes"]) == 5 and not changes["Done"]
        rest = get(node, f"/changes?since={changes['Last']}&limit=10000").json()
        assert rest["Done"] and rest["Changes"][0]["Seq"] == changes["Last"] + 1
        for text in (metrics, str(changes), str(rest), node.log_text()):
            assert PATIENT not in text and "DOE" not in text
    finally:
        node.stop()
    # With local reads off, even this machine needs a token.
    node = start(tmp_path / "strict", {"api": {"local_reads": False}})
    try:
        assert get(node, "/studies").status_code == 401
        assert get(node, "/studies", headers=AUTH).status_code == 200
    finally:
        node.stop()


def test_rule_changes_apply_at_once_and_are_written_back_with_who(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"alice {TOKEN}\n")
    token_file.chmod(0o644)
    cfg = {"assembly": {"series_quiet_seconds": 0.5}, "api": {"token_file": str(token_file)},
           "rules": [{"name": "ct-only", "match": {"Modality": "CT"}, "pipelines": ["derive"]}]}
    loose = NodeProcess(tmp_path / "loose", cfg)
    refused = subprocess.run(loose.command(), capture_output=True, text=True, timeout=60, env=loose.env, cwd=ROOT)
    assert refused.returncode != 0 and "can be read by other users" in refused.stderr and "chmod 600" in refused.stderr
    token_file.chmod(0o600)
    node = NodeProcess(tmp_path / "node", cfg).start()
    try:
        assert storescu(node.port, phantom_series(tmp_path / "a", seed=41)).returncode == 0
        wait_for(lambda: "matches no rule" in node.log_text(), 20, what="unrouted series")
        mr = {"name": "mr", "match": {"Modality": "MR", "orientation": "sagittal"}, "pipelines": ["derive"]}
        # Validation: the same checks as at start, with the key in the message.
        bad = call(node, "PUT", "/rules/mr", {**mr, "pipelines": ["no-such-pipeline"]})
        assert bad.status_code == 422 and "no pipeline named 'no-such-pipeline'" in bad.json()["detail"]
        bad = call(node, "PUT", "/rules/mr", {**mr, "send_to": ["nowhere"]})
        assert bad.status_code == 422 and "'nowhere'" in bad.json()["detail"]
        assert call(node, "PUT", "/rules/mr", {**mr, "colour": "red"}).status_code == 422
        # A valid rule, first in the list.
        r = call(node, "PUT", "/rules/mr?position=0", mr)
        assert r.status_code == 200 and [x["name"] for x in r.json()] == ["mr", "ct-only"]
        on_disk = yaml.safe_load(node.config_path.read_text())
        assert [x["name"] for x in on_disk["rules"]] == ["mr", "ct-only"]
        assert node.config_path.with_name("node.yaml.bak").exists()
        audit = [e for e in (node.storage / "audit.jsonl").read_text().splitlines() if "config_changed" in e]
        assert len(audit) == 1 and '"user": "alice"' in audit[0]
        # Dry run by attributes and by a stored series.
        dry = call(node, "POST", "/rules/dry-run", {"attributes": {"Modality": "CT"}}).json()
        assert dry["would_run"] == ["ct-only"] and dry["rules"][0]["conditions"] == {"Modality": False, "orientation": False}
        stored = get(node, "/studies").json()[0]["ID"]
        series_uid = get(node, f"/studies/{stored}").json()["Series"][0]["ID"]
        assert call(node, "POST", "/rules/dry-run", {"series_uid": series_uid}).json()["would_run"] == ["mr"]
        # The new rule runs on the next series without a restart.
        assert storescu(node.port, phantom_series(tmp_path / "b", seed=42)).returncode == 0
        done = wait_for(lambda: [j for j in get(node, "/jobs").json() if j["State"] == "done"], 30, what="job by the new rule")
        assert done[0]["Rule"] == "mr" and done[0]["Seconds"] is not None
        # Order and delete.
        assert [x["name"] for x in call(node, "POST", "/rules/order", {"names": ["ct-only", "mr"]}).json()] == ["ct-only", "mr"]
        assert call(node, "POST", "/rules/order", {"names": ["mr"]}).status_code == 422
        assert call(node, "DELETE", "/rules/mr").json() == [{**cfg["rules"][0], "send_to": [], "scope": "series"}]
        assert call(node, "DELETE", "/rules/mr").status_code == 404
        assert [x["name"] for x in yaml.safe_load(node.config_path.read_text())["rules"]] == ["ct-only"]
    finally:
        node.stop()


def test_modalities_echo_store_and_jobs_resubmit(tmp_path: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc", {}).start()
    cfg = {"assembly": {"series_quiet_seconds": 0.5}, "jobs": {"max_attempts": 1},
           "rules": [{"name": "fails", "match": {}, "pipelines": ["failing"]}]}
    node = start(tmp_path / "node", cfg)
    try:
        dest = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        assert call(node, "PUT", "/modalities/archive", dest).json() == dest
        assert call(node, "PUT", "/modalities/bad", {"ae_title": "A\\B", "host": "x", "port": 1}).status_code == 422
        echo = call(node, "POST", "/modalities/archive/echo").json()
        assert echo["Success"] is True and echo["Status"] == 0
        call(node, "PUT", "/modalities/down", {**dest, "port": free_port()})
        down = call(node, "POST", "/modalities/down/echo")
        assert down.status_code == 502 and "no association" in down.json()["detail"]
        series = phantom_series(tmp_path, seed=43)
        assert storescu(node.port, series).returncode == 0
        dead = wait_for(lambda: get(node, "/jobs?state=dead").json(), 30, what="the failing job dead")[0]
        assert "always fails" in dead["Error"]
        # Send the stored study to Orthanc through the API.
        study = get(node, "/studies").json()[0]["ID"]
        sent = call(node, "POST", "/modalities/archive/store", {"Resources": [study]}).json()
        wait_for(lambda: get(node, sent["Path"]).json()["State"] == "done", 30, what="send job done")
        assert len(orthanc.get("/instances")) == len(list(series.glob("*.dcm")))
        assert call(node, "POST", "/modalities/archive/store", {"Resources": ["1.2.3.4"]}).status_code == 404
        # Resubmit: dead jobs go back to the queue, done ones cannot.
        again = call(node, "POST", f"/jobs/{dead['ID']}/resubmit")
        assert again.status_code == 200 and again.json()["State"] == "queued"
        assert call(node, "POST", f"/jobs/{sent['ID']}/resubmit").status_code == 409
        assert call(node, "DELETE", "/modalities/down").status_code == 200
        assert "down" not in get(node, "/modalities").json()
        assert "dicomnode_job_seconds_count" in get(node, "/metrics").text
    finally:
        node.stop()
        orthanc.stop()


def test_pipelines_describe_their_models(tmp_path: Path) -> None:
    node = start(tmp_path, {})
    try:
        by_name = {p["Name"]: p for p in get(node, "/pipelines").json()}
        assert {"spine-seg", "lordosis", "marrow", "disc-herniation", "degeneration", "derive"} <= set(by_name)
        seg = by_name["spine-seg"]
        assert seg["Model"]["name"] == "spine-seg" and seg["Model"]["metrics"] and seg["Loaded"] is False
        assert by_name["derive"]["Model"] is None
    finally:
        node.stop()


@pytest.mark.slow
def test_openapi_has_no_server_error_under_schemathesis(tmp_path: Path) -> None:
    node = start(tmp_path, {"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
                            "rules": [{"name": "mr", "match": {"Modality": "MR"}, "pipelines": ["derive"], "send_to": ["pacs"]}]})
    try:
        assert storescu(node.port, phantom_series(tmp_path, seed=44)).returncode == 0
        exe = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "schemathesis"
        r = subprocess.run([str(exe if exe.exists() else "schemathesis"), "run", node.api_url + "/openapi.json",
                            "--checks", "not_a_server_error", "-H", f"Authorization: Bearer {TOKEN}", "--max-examples", "25",
                            "--seed", "1", "--no-color"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stdout[-4000:]
        assert "Traceback" not in node.log_text()
    finally:
        node.stop()
