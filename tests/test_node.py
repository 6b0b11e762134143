"""The node with real peers on loopback: DCMTK's echoscu/storescu, pynetdicom, Orthanc."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import MRImageStorage

from tests.node_helpers import (
    NodeProcess,
    Orthanc,
    bulk_instances,
    cpu_seconds,
    dcmtk,
    dicomnode_cmd,
    dicomnode_env,
    free_port,
    phantom_series,
    raw_c_store,
    wait_for,
)


def jobs(node: NodeProcess) -> list[dict]:
    db = sqlite3.connect(node.storage / "jobs.sqlite")
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM jobs ORDER BY id")]


def indexed(node: NodeProcess) -> set[str]:
    db = sqlite3.connect(node.storage / "index.sqlite")
    return {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}


def storescu(port: int, *paths: Path, aet: str = "STORESCU", options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk("storescu"), "-aet", aet, "-aec", "DICOMNODE", *options, "+sd", "+r", "127.0.0.1", str(port),
                           *map(str, paths)], capture_output=True, text=True, timeout=600)


@pytest.fixture
def node(tmp_path: Path):
    n = NodeProcess(tmp_path, {"accept": {"calling_ae_titles": ["STORESCU", "ORTHANC", "SCU"]}}).start()
    yield n
    n.stop()


def test_echoscu_and_storescu_study_plus_500_instances(node: NodeProcess, tmp_path: Path) -> None:
    r = subprocess.run([dcmtk("echoscu"), "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)], capture_output=True)
    assert r.returncode == 0, r.stderr
    series = phantom_series(tmp_path)
    bulk = bulk_instances(next(series.glob("*.dcm")), tmp_path / "bulk", 500, series=4)
    r = storescu(node.port, series, tmp_path / "bulk")
    assert r.returncode == 0, r.stderr
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*series.glob("*.dcm"), *bulk]}
    assert indexed(node) == sent
    db = sqlite3.connect(node.storage / "index.sqlite")
    assert db.execute("SELECT COUNT(DISTINCT series_uid), COUNT(DISTINCT study_uid) FROM instances").fetchone() == (5, 2)
    for path, series_uid in db.execute("SELECT path, series_uid FROM instances"):
        assert pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID == series_uid


def _encode(ds: pydicom.Dataset) -> bytes:
    return encode(ds, False, True)  # explicit VR little endian, as negotiated


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the '../../x' UID is sent on purpose
def test_bad_input_gets_a_status_and_loses_nothing_else(node: NodeProcess, tmp_path: Path) -> None:
    r = subprocess.run([dcmtk("echoscu"), "-aet", "INTRUDER", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)], capture_output=True)
    assert r.returncode != 0
    wait_for(lambda: "calling AE 'INTRUDER'" in node.log_text(), 10, what="rejection logged")

    good = [pydicom.dcmread(p) for p in sorted(phantom_series(tmp_path).glob("*.dcm"))[:2]]
    ae = AE(ae_title="SCU")
    ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
    ae.add_requested_context("1.2.3.4.5.6.7.8", "1.2.840.10008.1.2.1")  # not a storage SOP class
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        assert [c.abstract_syntax for c in assoc.rejected_contexts] == ["1.2.3.4.5.6.7.8"]
        assert int(assoc.send_c_store(good[0]).Status) == 0
        encoded = _encode(good[1])
        assert raw_c_store(assoc, str(good[1].SOPInstanceUID), encoded[:-1000], 11) == 0xC210  # pixel data cut
        assert raw_c_store(assoc, str(good[1].SOPInstanceUID), encoded[:400], 15) == 0xC211  # cut before the UIDs
        no_uid = copy.deepcopy(good[1])
        del no_uid.SOPInstanceUID
        assert raw_c_store(assoc, "1.2.3.4", _encode(no_uid), 12) == 0xC211
        path_like = copy.deepcopy(good[1])
        path_like.SOPInstanceUID = "../../x"
        assert raw_c_store(assoc, "../../x", _encode(path_like), 13) == 0xC211
        mismatch = copy.deepcopy(good[1])
        assert raw_c_store(assoc, "1.2.3.999", _encode(mismatch), 14) == 0xA900
        assert int(assoc.send_c_store(good[1]).Status) == 0  # the association still works
    finally:
        assoc.release()
    assert indexed(node) == {str(good[0].SOPInstanceUID), str(good[1].SOPInstanceUID)}
    assert not list(node.storage.rglob("x.dcm")) and not (tmp_path / "x.dcm").exists()
    text = node.log_text()
    for words in ("pixel data is shorter", "SOP Instance UID is missing", "'../../x' is not a valid DICOM UID", "differs from the command"):
        assert words in text, words


@pytest.mark.parametrize("receivers", [1, 2])
def test_sigkill_mid_transfer_loses_no_acknowledged_instance(tmp_path: Path, receivers: int) -> None:
    """With two receivers the association goes to the receiver process, which ends with the node."""
    node = NodeProcess(tmp_path, {"node": {"receivers": receivers}}).start()
    if receivers > 1:
        node.wait_receivers_ready()
    files = bulk_instances(next(phantom_series(tmp_path).glob("*.dcm")), tmp_path / "bulk", 500)
    acknowledged: list[str] = []

    def send() -> None:
        ae = AE(ae_title="SCU")
        ae.add_requested_context(MRImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
        for p in files:
            ds = pydicom.dcmread(p)
            try:
                status = assoc.send_c_store(ds)
            except Exception:
                return
            if status and int(status.Status) == 0:
                acknowledged.append(str(ds.SOPInstanceUID))
            if not assoc.is_established:
                return

    t = threading.Thread(target=send)
    t.start()
    wait_for(lambda: len(acknowledged) >= 150, 120, 0.01, "150 instances acknowledged")
    node.kill()
    t.join(60)
    assert 150 <= len(acknowledged) < 500
    node.start()  # same storage: the index must hold every acknowledged instance
    try:
        stored = indexed(node)
        assert set(acknowledged) <= stored
        db = sqlite3.connect(node.storage / "index.sqlite")
        for (path,) in db.execute("SELECT path FROM instances"):
            assert pydicom.dcmread(path).SOPInstanceUID in stored
    finally:
        node.stop()


def test_interrupted_job_runs_again_after_restart(tmp_path: Path) -> None:
    markers = tmp_path / "markers"
    cfg = {"assembly": {"series_quiet_seconds": 0.5},
           "rules": [{"name": "all-mr", "match": {"Modality": "MR"}, "pipelines": ["slow-derive"]}]}
    node = NodeProcess(tmp_path, cfg, env={"DICOMNODE_TEST_MARKERS": str(markers), "DICOMNODE_TEST_SLEEP": "5"}).start()
    assert storescu(node.port, phantom_series(tmp_path)).returncode == 0
    wait_for(lambda: markers.exists() and len(list(markers.iterdir())) == 1, 30, what="first attempt started")
    node.kill()
    assert jobs(node)[0]["state"] == "running"
    node.start()
    try:
        wait_for(lambda: jobs(node)[0]["state"] == "done", 60, what="job done after restart")
        assert len(list(markers.iterdir())) == 2
        assert len(jobs(node)) == 1
    finally:
        node.stop()


def test_series_matching_no_rule_is_stored_and_logged(tmp_path: Path) -> None:
    cfg = {"assembly": {"series_quiet_seconds": 0.5},
           "rules": [{"name": "ct-only", "match": {"Modality": "CT"}, "pipelines": ["derive"]}]}
    node = NodeProcess(tmp_path, cfg).start()
    try:
        series = phantom_series(tmp_path)
        assert storescu(node.port, series).returncode == 0
        wait_for(lambda: "matches no rule: stored, not processed" in node.log_text(), 20, what="unrouted log line")
        assert len(indexed(node)) == len(list(series.glob("*.dcm")))
        assert jobs(node) == []
    finally:
        node.stop()


def test_orthanc_pushes_a_study_and_gets_the_result_back(tmp_path: Path) -> None:
    node_port = free_port()
    orthanc = Orthanc(tmp_path, {"node": ["DICOMNODE", "127.0.0.1", node_port]}).start()
    try:
        for dest, via in (("pacs", "C-STORE"), ("pacs-rest", "REST")):
            cfg = {"node": {"port": node_port, "storage": str(tmp_path / f"var-{dest}")},
                   "accept": {"calling_ae_titles": ["ORTHANC"]},
                   "assembly": {"series_quiet_seconds": 0.5},
                   "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
                                    "pacs-rest": {"url": orthanc.url}},
                   "rules": [{"name": "lumbar-sagittal", "match": {"Modality": "MR", "SeriesDescription": "(?i)sag"},
                              "pipelines": ["derive"], "send_to": [dest]}]}
            node = NodeProcess(tmp_path / dest, cfg).start()
            try:
                series = phantom_series(tmp_path / dest, seed=30 if dest == "pacs" else 31)
                ids = [orthanc.post("/instances", p.read_bytes())["ParentStudy"] for p in sorted(series.glob("*.dcm"))]
                orthanc.post("/modalities/node/store", {"Resources": [ids[0]], "Synchronous": True})
                assert len(indexed(node)) == len(ids)
                found = wait_for(lambda: [s for s in orthanc.get("/series?expand")
                                          if s["MainDicomTags"].get("SeriesDescription") == "TEST DERIVED"
                                          and s["ParentStudy"] == ids[0]], 60, what=f"result back in Orthanc by {via}")
                assert len(found) == 1
                # The send job is marked done just after the destination acknowledged it.
                wait_for(lambda: [j["state"] for j in jobs(node)] == ["done", "done"], 10, what="both jobs done")
            finally:
                node.stop()
    finally:
        orthanc.stop()


def test_destination_down_goes_dead_and_retry_delivers(tmp_path: Path) -> None:
    receiver = NodeProcess(tmp_path / "receiver", {})
    cfg = {"assembly": {"series_quiet_seconds": 0.5},
           "jobs": {"backoff_seconds": 0.3, "send_max_attempts": 3},
           "destinations": {"archive": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": receiver.port}},
           "rules": [{"name": "all", "match": {}, "pipelines": ["derive"], "send_to": ["archive"]}]}
    node = NodeProcess(tmp_path / "sender", cfg).start()
    try:
        assert storescu(node.port, phantom_series(tmp_path)).returncode == 0
        send_job = wait_for(lambda: [j for j in jobs(node) if j["kind"] == "send" and j["state"] == "dead"], 30,
                            what="send job dead")[0]
        assert send_job["attempts"] == 3 and "no association" in send_job["last_error"]
        assert "it is dead, `dicomnode retry` sends it again" in node.log_text()
        receiver.start()
        cli = subprocess.run([*dicomnode_cmd(), "retry", str(send_job["id"]), "--config", str(node.config_path)],
                             capture_output=True, text=True, env=node.env)
        assert cli.returncode == 0, cli.stderr
        wait_for(lambda: jobs(node)[send_job["id"] - 1]["state"] == "done", 30, what="retried job delivered")
        assert len(indexed(receiver)) == 1
    finally:
        node.stop()
        receiver.stop()


def test_eight_senders_at_once_store_everything_once(node: NodeProcess, tmp_path: Path) -> None:
    template = next(phantom_series(tmp_path).glob("*.dcm"))
    folders = []
    for i in range(8):
        bulk_instances(template, tmp_path / f"b{i}", 200)
        folders.append(tmp_path / f"b{i}")
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "DICOMNODE", "+sd", "+r", "127.0.0.1", str(node.port), str(f)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for f in folders]
    assert all(p.wait(600) == 0 for p in procs)
    db = sqlite3.connect(node.storage / "index.sqlite")
    assert db.execute("SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances").fetchone() == (1600, 1600)
    assert sum(1 for _ in (node.storage / "instances").rglob("*.dcm")) == 1600


def test_a_2gb_pdu_claim_does_not_hurt_the_node(node: NodeProcess, tmp_path: Path) -> None:
    """A peer announces a 2 GB A-ASSOCIATE-RQ and sends 10 bytes: the node drops it and serves on."""
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(struct.pack(">BBL", 0x01, 0x00, 0x7FFFFFFF) + b"\x00" * 10)
        time.sleep(0.5)
    r = subprocess.run([dcmtk("echoscu"), "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert node.proc is not None and node.proc.poll() is None


def test_no_patient_data_in_logs_or_audit(tmp_path: Path) -> None:
    cfg = {"assembly": {"series_quiet_seconds": 0.5},
           "rules": [{"name": "all", "match": {}, "pipelines": ["derive"]}]}
    node = NodeProcess(tmp_path, cfg).start()
    try:
        series = phantom_series(tmp_path)
        ds = pydicom.dcmread(next(series.glob("*.dcm")))
        assert storescu(node.port, series).returncode == 0
        wait_for(lambda: any(j["state"] == "done" for j in jobs(node)), 30, what="job done")
    finally:
        node.stop()
    text = node.log_text() + (node.storage / "audit.jsonl").read_text()
    events = {json.loads(line)["event"] for line in (node.storage / "audit.jsonl").read_text().splitlines()}
    assert {"received", "routed", "started", "finished"} <= events
    for phi in (str(ds.PatientName), str(ds.PatientID), str(ds.PatientBirthDate)):
        assert phi not in text


def test_late_instances_start_a_new_run_and_compressed_syntaxes_are_stored(tmp_path: Path) -> None:
    cfg = {"assembly": {"series_quiet_seconds": 0.5}, "rules": [{"name": "all", "match": {}, "pipelines": ["derive"]}]}
    node = NodeProcess(tmp_path, cfg).start()
    try:
        files = sorted(phantom_series(tmp_path).glob("*.dcm"))
        assert storescu(node.port, *files[:-1]).returncode == 0
        wait_for(lambda: [j["state"] for j in jobs(node)] == ["done"], 30, what="first run done")
        # The last slice arrives late, JPEG-compressed: stored, and the series runs again, whole.
        late = tmp_path / "late.dcm"
        assert subprocess.run(["dcmcjpeg", "+e1", str(files[-1]), str(late)], capture_output=True).returncode == 0
        assert pydicom.dcmread(late).file_meta.TransferSyntaxUID.is_compressed
        assert storescu(node.port, late, options=("-xs",)).returncode == 0  # propose JPEG lossless
        wait_for(lambda: [j["state"] for j in jobs(node)] == ["done", "done"], 30, what="second run done")
        second = json.loads(jobs(node)[1]["payload"])
        assert second["instances"] == len(files)
        assert len(indexed(node)) == len(files)
        status = subprocess.run([*dicomnode_cmd(), "status", "--config", str(node.config_path)], capture_output=True,
                                text=True, env=node.env)
        assert f"1 studies, 1 series, {len(files)} instances" in status.stdout and "done 2" in status.stdout
    finally:
        node.stop()


def test_destination_down_for_a_while_gets_the_result_when_back(tmp_path: Path) -> None:
    receiver = NodeProcess(tmp_path / "receiver", {})
    cfg = {"assembly": {"series_quiet_seconds": 0.5}, "jobs": {"backoff_seconds": 0.5, "send_max_attempts": 8},
           "destinations": {"archive": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": receiver.port}},
           "rules": [{"name": "all", "match": {}, "pipelines": ["derive"], "send_to": ["archive"]}]}
    node = NodeProcess(tmp_path / "sender", cfg).start()
    try:
        assert storescu(node.port, phantom_series(tmp_path)).returncode == 0
        wait_for(lambda: [j for j in jobs(node) if j["kind"] == "send" and j["state"] == "failed"], 30, what="a failed attempt")
        receiver.start()
        send = wait_for(lambda: [j for j in jobs(node) if j["kind"] == "send" and j["state"] == "done"], 60, what="delivered")[0]
        assert send["attempts"] >= 2
        assert len(indexed(receiver)) == 1
    finally:
        node.stop()
        receiver.stop()


def test_study_rules_wait_for_the_whole_study(tmp_path: Path) -> None:
    from training.phantom.generator import PhantomOptions, generate_study

    generate_study(tmp_path / "study", 12, PhantomOptions(contrasts=("T1", "T2"), max_matrix=192))
    t1, t2 = (tmp_path / "study" / "dicom" / s for s in ("series_1", "series_2"))
    n = len(list(t1.glob("*.dcm"))) + len(list(t2.glob("*.dcm")))
    cfg = {"assembly": {"series_quiet_seconds": 0.3, "study_quiet_seconds": 4.0},
           "rules": [{"name": "t1-only", "match": {"SeriesDescription": "(?i)t1"}, "pipelines": ["derive"]},
                     {"name": "modic", "scope": "study", "match": {"SeriesDescription": "(?i)t2"}, "pipelines": ["derive"]}]}
    node = NodeProcess(tmp_path, cfg).start()
    try:
        assert storescu(node.port, t1).returncode == 0
        wait_for(lambda: [j["state"] for j in jobs(node)] == ["done"], 30, what="series job on T1")
        time.sleep(0.5)  # the T1 series is long complete, the study is not yet: no study job so far
        assert len(jobs(node)) == 1
        assert storescu(node.port, t2).returncode == 0
        both = wait_for(lambda: [j for j in jobs(node) if j["state"] == "done"][1:], 30, what="study job")
        assert len(jobs(node)) == 2  # T2 matches only the study rule: no series job for it
        study_job = both[0]
        assert json.loads(study_job["payload"])["scope"] == "study"
        derived = pydicom.dcmread(node.storage / "results" / f"job-{study_job['id']}" / "derived.dcm")
        assert derived.ImageComments == f"derived from {n} instances"
    finally:
        node.stop()


def test_each_association_gets_its_own_contexts_sharing_the_uids() -> None:
    """The per-association copy of the listener's contexts: new context objects (negotiation
    writes results into them), equal syntaxes, the same immutable UID objects."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
    from pynetdicom.presentation import build_context

    from dicomnode.scp import SharedUIDContexts

    contexts = SharedUIDContexts([build_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES) for cx in AllStoragePresentationContexts])
    copied = copy.deepcopy(contexts)
    assert len(copied) == len(contexts) > 100
    for a, b in zip(contexts, copied):
        assert a is not b and a.transfer_syntax == b.transfer_syntax and a.abstract_syntax is b.abstract_syntax
    copied[0].result, copied[0].context_id = 0, 1
    copied[0].transfer_syntax = [ALL_TRANSFER_SYNTAXES[0]]
    assert contexts[0].result is None and contexts[0].context_id is None
    assert len(contexts[0].transfer_syntax) == len(ALL_TRANSFER_SYNTAXES)


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA900, 0xC211])
@pytest.mark.parametrize("instance_uid", ["1.2.3.45", "1.2.3.4"])  # even and odd length: padding
def test_c_store_response_encoded_as_pynetdicom_does(status: int, instance_uid: str) -> None:
    """The listener encodes plain C-STORE responses itself (`reactor.c_store_rsp_command`): the
    bytes are pynetdicom's own; a response with an error comment is left to pynetdicom."""
    from pynetdicom.dimse_messages import C_STORE_RSP

    from dicomnode.reactor import c_store_rsp_command

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 65535, status
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = MRImageStorage, instance_uid
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    assert c_store_rsp_command(rsp) == encode(message.command_set, True, True)
    rsp.ErrorComment = "disk full"
    assert c_store_rsp_command(rsp) is None
    request = C_STORE()
    request.MessageID, request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = 1, MRImageStorage, instance_uid
    assert c_store_rsp_command(request) is None


def test_idle_associations_wait_instead_of_polling() -> None:
    """pynetdicom's two threads per association poll every millisecond; the listener's wait on
    their socket and queues (`dicomnode.reactor`) and still echo, release and abort as before.
    A connection closed before any association request ends at once, not after the ACSE timeout."""
    from collections import Counter

    from pynetdicom.sop_class import Verification

    from dicomnode.scp import Listener

    ae = AE("DICOMNODE")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.make_server(("127.0.0.1", port), server_class=Listener)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    scu = AE("STORESCU")
    scu.add_requested_context(Verification)
    try:
        assoc = scu.associate("127.0.0.1", port)
        assert assoc.is_established
        wait_for(lambda: server.active_associations, 5)
        acceptor = server.active_associations[0]
        calls: Counter[str] = Counter()
        look_at_socket, look_for_message = acceptor.dul._is_transport_event, acceptor.dimse.get_msg
        acceptor.dul._is_transport_event = lambda: calls.update(["dul"]) or look_at_socket()
        acceptor.dimse.get_msg = lambda block=False: calls.update(["dimse"]) or look_for_message(block)
        time.sleep(0.5)
        assert 0 < calls["dul"] < 50 and 0 < calls["dimse"] < 50, calls  # polling: ~500 each
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        assert assoc.is_released
        aborted = scu.associate("127.0.0.1", port)
        aborted.abort()
        wait_for(lambda: not server.active_associations, 5)
        probe = socket.create_connection(("127.0.0.1", port))  # a port probe: connects, sends nothing, closes
        wait_for(lambda: server.open == 1, 5)
        probe.close()
        wait_for(lambda: server.open == 0 and not server.active_associations, 3, what="the probe's association ended")
    finally:
        server.shutdown()


def test_large_buffers_are_reused_not_mapped_afresh() -> None:
    """`keep_large_buffers` (called when the listener starts): a 1 MiB buffer allocated and freed
    again and again no longer faults in fresh pages each time (in a fresh interpreter)."""
    script = """
import resource
from dicomnode.scp import keep_large_buffers
def faults(n=50):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        b = bytearray(1 << 20); b[::4096] = bytes(256); del b
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n
before = faults()
assert keep_large_buffers()
faults(1)
print(before, faults())
"""
    out = subprocess.run([sys.executable, "-c", script], env=dicomnode_env(), capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert before >= 2 and after < 0.5, (before, after)


def receiver_pids(node: NodeProcess) -> list[int]:
    """The node's receiver processes (spawned by multiprocessing; not its resource tracker)."""
    pids = []
    for c in subprocess.run(["pgrep", "-P", str(node.proc.pid)], capture_output=True, text=True).stdout.split():
        try:
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes():
                pids.append(int(c))
        except FileNotFoundError:  # exited meanwhile
            pass
    return pids


def connections_held(pid: int, port: int) -> int:
    """Established TCP connections to local `port` whose socket process `pid` holds (the kernel's
    own account: /proc/net/tcp and the process's file descriptors)."""
    established = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":
            established.add(fields[9])
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        held += target.startswith("socket:[") and target[8:-1] in established
    return held


def test_associations_are_spread_evenly_over_receiver_processes(tmp_path: Path) -> None:
    """With `node.receivers: 2` the node accepts and passes each new connection to the process with
    fewer open associations: eight held open are four and four, by the kernel's account and in
    /system; each one works; once released, the counts are back to zero."""
    from pynetdicom.sop_class import Verification

    node = NodeProcess(tmp_path / "node", {"node": {"receivers": 2}}).start()
    scu = AE("STORESCU")
    scu.add_requested_context(Verification)
    assocs = []
    try:
        [receiver] = wait_for(lambda: receiver_pids(node), 30, what="a receiver process")
        node.wait_receivers_ready()
        for _ in range(8):
            assocs.append(scu.associate("127.0.0.1", node.port, ae_title="DICOMNODE"))
            assert assocs[-1].is_established
        held = [connections_held(node.proc.pid, node.port), connections_held(receiver, node.port)]
        system = json.loads(urllib.request.urlopen(node.api_url + "/system", timeout=10).read())
        assert (held, system["Receivers"]["OpenAssociations"]) == ([4, 4], [4, 4])
        metrics = urllib.request.urlopen(node.api_url + "/metrics", timeout=10).read().decode()
        assert 'dicomnode_associations_open{process="0"} 4' in metrics and 'dicomnode_associations_open{process="1"} 4' in metrics
        assert all(a.send_c_echo().Status == 0 for a in assocs)
        for a in assocs:
            a.release()

        def open_now() -> list[int]:
            return json.loads(urllib.request.urlopen(node.api_url + "/system", timeout=10).read())["Receivers"]["OpenAssociations"]
        wait_for(lambda: open_now() == [0, 0], 10, what="the associations counted as ended")
    finally:
        for a in assocs:
            a.abort()
        node.stop()


def test_receiver_processes_take_associations_and_report_to_the_node(tmp_path: Path) -> None:
    """`node.receivers: 2`: a second process serves associations the node accepts. Sixteen senders at once:
    every instance stored once, every series routed once, the audit and /metrics count every
    instance, and the receiver did its share. Killed, it is started again; it ends with the node,
    even when the node is killed."""
    node = NodeProcess(tmp_path / "node", {"node": {"receivers": 2}, "assembly": {"series_quiet_seconds": 1},
                                           "rules": [{"name": "all", "match": {}, "pipelines": ["derive"]}]}).start()
    try:
        [receiver] = wait_for(lambda: receiver_pids(node), 30, what="a receiver process")
        node.wait_receivers_ready()
        template = next(phantom_series(tmp_path).glob("*.dcm"))
        folders = [tmp_path / f"s{i}" for i in range(16)]
        for f in folders:
            bulk_instances(template, f, 25)
        cpu0 = cpu_seconds(receiver)
        procs = [subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "DICOMNODE", "+sd", "+r", "127.0.0.1", str(node.port),
                                   str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for f in folders]
        assert all(p.wait(600) == 0 for p in procs)
        assert cpu_seconds(receiver) - cpu0 > 0.1  # it received some of the associations
        db = sqlite3.connect(node.storage / "index.sqlite")
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT sop_instance_uid) FROM instances").fetchone() == (400, 400)
        wait_for(lambda: len([j for j in jobs(node) if j["state"] == "done"]) == 16, 120, what="16 jobs done")
        assert len({j["series_uid"] for j in jobs(node)}) == 16
        audit = (node.storage / "audit.jsonl").read_text()
        assert audit.count('"event": "received"') == 400
        metrics = urllib.request.urlopen(node.api_url + "/metrics", timeout=10).read().decode()
        assert 'dicomnode_c_store_total{status="success"} 400' in metrics
        system = json.loads(urllib.request.urlopen(node.api_url + "/system", timeout=10).read())
        assert system["Receivers"] == {"Configured": 2, "Running": 2, "OpenAssociations": [0, 0]}

        os.kill(receiver, signal.SIGKILL)
        wait_for(lambda: b"exited with code" in node.log.read_bytes(), 10, what="the node noticing")
        # Until it is back, the main process keeps every association itself.
        echo = subprocess.run([dcmtk("echoscu"), "-aet", "STORESCU", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)], capture_output=True)
        assert echo.returncode == 0, echo.stderr
        [again] = wait_for(lambda: [p for p in receiver_pids(node) if p != receiver], 30, what="the receiver restarted")
        assert b"starting it again" in node.log.read_bytes()
        metrics = urllib.request.urlopen(node.api_url + "/metrics", timeout=10).read().decode()
        assert "dicomnode_receiver_restarts_total 1" in metrics
        assert storescu(node.port, folders[0]).returncode == 0
        node.kill()
        wait_for(lambda: not Path(f"/proc/{again}").exists() or b"State:\tZ" in Path(f"/proc/{again}/status").read_bytes(),
                 20, what="the receiver ended with the node")
    finally:
        node.stop()
