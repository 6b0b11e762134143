"""Outgoing DICOM and Orthanc REST: C-ECHO and C-STORE as an SCU, `POST /instances`.

Every socket the node opens gets TCP_NODELAY: with Nagle's algorithm on, small PDUs stall about
40 ms each against Debian's DCMTK.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

log = logging.getLogger("dicomnode.scu")


class SendError(RuntimeError):
    """A destination did not acknowledge; the message says which and why."""


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for both directions."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


NODELAY_HANDLERS = [(evt.EVT_CONN_OPEN, set_nodelay)]


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # DICOM TLS, the peer's certificate checked against `host`

    def associate(self, ae: AE):
        tls_args = (self.tls, self.host) if self.tls is not None else None
        return ae.associate(self.host, self.port, ae_title=self.ae_title, evt_handlers=NODELAY_HANDLERS, tls_args=tls_args)


def echo(peer: Peer, calling_ae: str = "DICOMNODE", timeout: float = 10) -> int:
    """C-ECHO; returns the DIMSE status (0 = Success) or raises SendError when unreachable."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    assoc = peer.associate(ae)
    if not assoc.is_established:
        raise SendError(f"C-ECHO: no association with {peer.ae_title}@{peer.host}:{peer.port} (refused, rejected or unreachable)")
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def store(peer: Peer, files: list[Path], calling_ae: str = "DICOMNODE", timeout: float = 30) -> int:
    """C-STORE every file in one association, proposing each file's SOP class and transfer syntax.

    Raises SendError unless every instance is acknowledged with Success or a warning.
    """
    headers = [(p, pydicom.dcmread(p, stop_before_pixels=True)) for p in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = timeout
    contexts = {(str(h.SOPClassUID), str(h.file_meta.TransferSyntaxUID)) for _, h in headers}
    if len(contexts) > 128:
        raise SendError(f"{len(contexts)} SOP class / transfer syntax pairs do not fit one association")
    for sop_class, syntax in sorted(contexts):
        ae.add_requested_context(sop_class, syntax)
    assoc = peer.associate(ae)
    if not assoc.is_established:
        raise SendError(f"C-STORE: no association with {peer.ae_title}@{peer.host}:{peer.port} (refused, rejected or unreachable)")
    sent = 0
    try:
        for path, _ in headers:
            status = assoc.send_c_store(path)
            code = int(status.Status) if status else -1
            if code != 0 and not (0xB000 <= code <= 0xBFFF):
                raise SendError(f"C-STORE of {path.name} to {peer.ae_title}: status 0x{code & 0xFFFF:04X}"
                                if code >= 0 else f"C-STORE of {path.name} to {peer.ae_title}: no response")
            sent += 1
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def post_instances(url: str, files: list[Path], username: str | None = None, password: str | None = None,
                   timeout: float = 30) -> int:
    """Orthanc REST upload, one `POST {url}/instances` per file."""
    auth = (username, password) if username else None
    for p in files:
        try:
            r = requests.post(url.rstrip("/") + "/instances", data=p.read_bytes(), auth=auth, timeout=timeout,
                              headers={"Content-Type": "application/dicom"})
        except requests.RequestException as e:
            raise SendError(f"POST {url}/instances: {type(e).__name__}: unreachable") from None
        if r.status_code != 200:
            raise SendError(f"POST {url}/instances of {p.name}: HTTP {r.status_code}")
    return len(files)
