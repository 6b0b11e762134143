"""The listener reads C-STORE requests itself (`dicomnode.cstore`); pynetdicom keeps the rest."""

from __future__ import annotations

import logging
import socket
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from dicomnode.audit import Audit
from dicomnode.config import NodeConfig
from dicomnode.cstore import COMMAND, LAST, p_data_tf
from dicomnode.scp import StoreSCP
from dicomnode.storage import Identity, Storage
from tests.node_helpers import free_port, raw_c_store, wait_for


def mr_instance(study: str, series: str) -> Dataset:
    """A small MR image: 32 KiB of pixel data, several PDUs at the listener's 4 KiB maximum."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "MR"
    ds.Rows = ds.Columns = 128
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.random.default_rng(1).integers(0, 4096, (128, 128), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.fixture
def listener(tmp_path: Path):
    """The node's listener in this process (4 KiB PDUs), and an SCU association to it."""
    root, port = tmp_path / "var", free_port()
    cfg = NodeConfig.model_validate({"node": {"port": port, "storage": str(root), "max_pdu": 4096}})
    stored: list[Identity] = []
    scp = StoreSCP(cfg, Storage(root), Audit(root / "audit.jsonl"), stored.append)
    server = scp.start()
    ae = AE("SCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=cfg.node.ae_title)
    assert assoc.is_established
    wait_for(lambda: server.active_associations, 5)
    acceptor = server.active_associations[0]
    seen_by_pynetdicom: list[object] = []
    receive = acceptor.dimse.receive_primitive
    acceptor.dimse.receive_primitive = lambda p: seen_by_pynetdicom.append(p) or receive(p)
    yield scp, assoc, stored, seen_by_pynetdicom
    if assoc.is_established:
        assoc.release()
    scp.stop()


def _command(sop_class_uid: str, sop_instance_uid: str, message_id: int) -> bytes:
    req = C_STORE()
    req.MessageID, req.Priority = message_id, 2
    req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = sop_class_uid, sop_instance_uid
    req.DataSet = BytesIO(b"\0\0")  # the command then says a data set follows
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    return encode(message.command_set, True, True)


def test_c_store_is_read_by_the_listener_stored_as_sent_and_echo_still_works(listener) -> None:
    scp, assoc, stored, seen_by_pynetdicom = listener
    ds = mr_instance(generate_uid(), generate_uid())
    assert assoc.send_c_store(ds).Status == 0
    assert seen_by_pynetdicom == []  # nine PDUs, none decoded by pynetdicom
    assert [i.sop_instance_uid for i in stored] == [ds.SOPInstanceUID]
    saved = pydicom.dcmread(scp.storage.path_for(stored[0]))
    assert saved.PixelData == ds.PixelData and saved.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert saved.file_meta.SourceApplicationEntityTitle == "SCU"
    assert assoc.send_c_echo().Status == 0
    assert len(seen_by_pynetdicom) == 1  # C-ECHO is pynetdicom's


def test_a_failing_store_handler_answers_processing_failure_and_the_association_goes_on(listener, monkeypatch) -> None:
    scp, assoc, stored, _ = listener

    def broken(*args: object) -> str:
        raise RuntimeError("index corrupt")

    study, series = generate_uid(), generate_uid()
    monkeypatch.setattr(scp.storage, "store", broken)
    assert assoc.send_c_store(mr_instance(study, series)).Status == 0xC211
    monkeypatch.undo()
    assert assoc.send_c_store(mr_instance(study, series)).Status == 0
    assert len(stored) == 1


def test_what_the_reader_does_not_understand_goes_to_pynetdicom(listener) -> None:
    """A command naming another SOP class than its context: pynetdicom serves it, the same handler stores it."""
    scp, assoc, stored, seen_by_pynetdicom = listener
    ds = mr_instance(generate_uid(), generate_uid())
    status = raw_c_store(assoc, ds.SOPInstanceUID, encode(ds, False, True), 7, sop_class_uid=CTImageStorage)
    assert status == 0 and seen_by_pynetdicom
    assert [i.sop_instance_uid for i in stored] == [ds.SOPInstanceUID]


def test_a_new_command_inside_a_data_set_aborts_the_association(listener, caplog) -> None:
    scp, assoc, stored, _ = listener
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == MRImageStorage)
    command = _command(MRImageStorage, generate_uid(), 9)
    with caplog.at_level(logging.ERROR, logger="dicomnode.scp"):
        assoc.dul.socket.send(p_data_tf(cx.context_id, COMMAND | LAST, command) + p_data_tf(cx.context_id, COMMAND | LAST, command))
        wait_for(lambda: assoc.is_aborted, 5, what="the listener's A-ABORT")
    assert stored == []
    assert any("aborted: a new message or another context before the data set" in r.getMessage() for r in caplog.records)


def test_a_sender_gone_in_the_middle_of_a_data_set_leaves_nothing_and_the_listener_serves_on(listener) -> None:
    scp, assoc, stored, _ = listener
    cx = next(c for c in assoc.accepted_contexts if c.abstract_syntax == MRImageStorage)
    assoc.dul.socket.send(p_data_tf(cx.context_id, COMMAND | LAST, _command(MRImageStorage, generate_uid(), 3))
                          + p_data_tf(cx.context_id, 0, b"\0" * 1000))  # a data set fragment, not the last
    assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: not scp.server.active_associations, 5, what="the listener's association ended")
    assert stored == [] and not list((scp.storage.root / "instances").rglob("*.dcm"))
    ae = AE("SCU")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    again = ae.associate("127.0.0.1", scp.cfg.node.port, ae_title=scp.cfg.node.ae_title)
    assert again.send_c_store(mr_instance(generate_uid(), generate_uid())).Status == 0
    again.release()
    assert len(stored) == 1
