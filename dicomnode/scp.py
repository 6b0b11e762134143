"""The node's DICOM listener: C-ECHO, and C-STORE of every storage SOP class.

Handlers return a status and do no slow work: the instance is written durably (that must happen
before Success) and the assembler is told; routing and pipelines run elsewhere. Most C-STORE
requests reach `StoreSCP.store` from the association's DUL thread (`dicomnode.cstore`), the rest
from pynetdicom's EVT_C_STORE.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import socket
import socketserver
import ssl
import struct
import threading
import time
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicomnode.audit import Audit
from dicomnode.config import NodeConfig
from dicomnode.cstore import StoreRequest
from dicomnode.metrics import Metrics
from dicomnode.reactor import EventDrivenRequestHandler
from dicomnode.scu import set_nodelay
from dicomnode.security import dicom_server_context
from dicomnode.storage import Identity, InvalidInstance, Storage

log = logging.getLogger("dicomnode.scp")

SUCCESS, OUT_OF_RESOURCES, SOP_MISMATCH, CANNOT_UNDERSTAND, INVALID_UID = 0x0000, 0xA700, 0xA900, 0xC210, 0xC211
_SKIP_VR = {"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"}


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_large_buffers(mmap_threshold: int = 16 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Let glibc reuse freed blocks of up to `mmap_threshold` bytes instead of unmapping them.

    Each instance passes through several buffers of its own size (PDU, dataset, file bytes). glibc
    may give blocks above 128 KiB a mapping of their own and unmap it when freed, so that every
    instance faults in fresh pages: in a receiver process ~66 minor faults and about a sixth of its
    CPU per 512 KiB instance (docs/BENCHMARKS.md). Freed memory beyond `trim_threshold` still goes
    back to the system. Process-wide; False where the C library has no `mallopt` (musl)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:
        return False
    return mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1


def routing_attributes(ds: Dataset) -> dict[str, Any]:
    """Top-level attributes a rule may match on (no pixel data, sequences or binary values)."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.VR in _SKIP_VR or not elem.keyword or elem.tag.group == 0x7FE0:
            continue
        v = elem.value
        if hasattr(v, "__iter__") and not isinstance(v, (str, bytes)):
            out[elem.keyword] = [str(x) for x in v]
        elif v is not None:
            out[elem.keyword] = str(v)
    return out


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One group-0002 element in explicit VR little endian, its value padded to even length
    (text with a space, UIDs and bytes with a NUL)."""
    value += (b" " if vr in (b"SH", b"AE") else b"\0") * (len(value) % 2)
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 2, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, "DICM" and File Meta Information for a received dataset (PS3.10 7.1). Written
    here because pynetdicom's `encoded_dataset` builds and validates it with pydicom, about 0.4 ms
    of each instance's CPU; the UIDs were checked already (`Identity.of`)."""
    group = b"".join([
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", sop_class_uid.encode()),
        _element(0x0003, b"UI", sop_instance_uid.encode()),
        _element(0x0010, b"UI", transfer_syntax.encode()),
        _element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode()),
        _element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode()),
        _element(0x0016, b"AE", source_ae.strip().encode("ascii", "replace")),
    ])
    return b"\0" * 128 + b"DICM" + _element(0x0000, b"UL", struct.pack("<I", len(group))) + group


class TruncatedInstance(ValueError):
    pass


def _check_pixel_length(ds: Dataset, transfer_syntax: UID) -> None:
    """Native (uncompressed) pixel data must hold the whole image: a cut-off transfer must not be
    stored as if it were complete."""
    if "PixelData" not in ds or transfer_syntax.is_compressed:
        return
    expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.get("NumberOfFrames", 1) or 1)
                * int(ds.BitsAllocated)) // 8
    if len(ds.PixelData) < expected:
        raise TruncatedInstance(f"its pixel data is shorter ({len(ds.PixelData)} bytes) than the image size ({expected} bytes): "
                              "the instance is truncated")


class SharedUIDContexts(list):
    """The listener's supported presentation contexts. pynetdicom deep-copies them for every
    association; for every storage SOP class with every transfer syntax that re-creates and
    re-validates ~8,000 UIDs, about 45 ms holding the interpreter lock per association. UIDs are
    immutable, so each association still gets its own context objects, sharing the UIDs (3 ms)."""

    def __init__(self, contexts: list) -> None:
        super().__init__(contexts)
        self._uids = {id(u): u for cx in self for u in (cx.abstract_syntax, *cx.transfer_syntax)}

    def __deepcopy__(self, memo: dict) -> list:
        memo.update(self._uids)
        return [copy.deepcopy(cx, memo) for cx in self]


class Listener(ThreadedAssociationServer):
    """pynetdicom's threaded server, made by `AE.make_server` rather than `start_server`; the AE
    does not list it, so shutting down leaves the AE's list alone. Its associations wait on events
    rather than polling (`dicomnode.reactor`).

    It counts its open associations (`open`), and may pass a new connection to another process
    (`handoff`, set by the node when it has receiver processes) before anything is read from it;
    the TLS handshake happens in the connection's own thread, in the process that keeps it.
    `on_closed` is called whenever an association it kept has ended."""

    handoff: Callable[[socket.socket, int], bool] | None = None
    on_closed: Callable[[], None] | None = None
    store: Callable[[StoreRequest], int] | None = None  # C-STORE read by the DUL (`dicomnode.cstore`)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, request_handler=EventDrivenRequestHandler, **kwargs)
        self.open = 0
        self._open_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        return self.socket.accept()  # not wrapped for TLS yet: the connection may go to another process

    def process_request(self, request: Any, client_address: Any) -> None:
        if self.handoff is not None and self.handoff(request, self.open):
            request.close()  # the receiver has its own descriptor; no shutdown, that would end the connection
            return
        with self._open_lock:
            self.open += 1
        super().process_request(request, client_address)

    def take(self, sock: socket.socket) -> None:
        """Serve a connection another process accepted and passed over."""
        try:
            address = sock.getpeername()
        except OSError:  # the peer has gone already
            sock.close()
            return
        self.process_request(sock, address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread: TLS handshake, then the association (which runs in a thread of its own)."""
        host, port = client_address[:2]
        if self.ssl_context:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)
            except (OSError, ValueError) as e:  # closed before a byte (a port probe): not worth a warning
                log.log(logging.DEBUG if isinstance(e, ssl.SSLEOFError) else logging.WARNING,
                        "DICOM TLS handshake with %s:%s failed, connection closed: %s", host, port, e)
                request.close()
                self.association_ended()
                return
        try:
            self.finish_request(request, client_address)
        except Exception as e:
            log.warning("connection from %s:%s closed before an association could start: %s", host, port, e)
            request.close()
            self.association_ended()

    def association_ended(self) -> None:
        with self._open_lock:
            self.open -= 1
        if self.on_closed is not None:
            self.on_closed()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class HandedListener(Listener):
    """A receiver process's listener: it binds nothing and takes only connections that the node's
    main process accepted and passed over (`take`), so that the main process can spread them
    evenly (SO_REUSEPORT spreads by a hash of the addresses: 3/5 or 2/6 of eight associations)."""

    def server_bind(self) -> None:
        pass

    def server_activate(self) -> None:
        pass

    def shutdown(self) -> None:  # serve_forever never ran: BaseServer.shutdown would wait for it
        self.server_close()


class StoreSCP:
    def __init__(self, cfg: NodeConfig, storage: Storage, audit: Audit, on_stored: Callable[[Identity], None],
                 metrics: Metrics | None = None):
        self.cfg, self.storage, self.audit, self.on_stored = cfg, storage, audit, on_stored
        self.metrics = metrics or Metrics()
        self.server: Listener | None = None

    def _ae(self) -> AE:
        ae = AE(ae_title=self.cfg.node.ae_title)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.cfg.accept.calling_ae_titles)
        ae.maximum_pdu_size = self.cfg.node.max_pdu
        ae.maximum_associations = 64
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self, listen: bool = True) -> Listener:
        """Listen on the node's port; or (`listen=False`, a receiver process) wait for connections
        that the main process passes over (`Listener.take`)."""
        handlers = [(evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_C_ECHO, lambda e: SUCCESS),
                    (evt.EVT_C_STORE, self.handle_store), (evt.EVT_REJECTED, self._rejected)]
        addr = (self.cfg.node.host, self.cfg.node.port)
        tls = self.cfg.node.tls
        # pynetdicom's standard handlers format every PDU and DIMSE message for its debug log even when
        # that logger is at WARNING (and keep the reactor from answering C-STORE itself); the node logs its own
        fast = not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)
        if fast:
            _config.LOG_HANDLER_LEVEL = "none"
        keep_large_buffers()
        ae = self._ae()
        self.server = ae.make_server(addr, contexts=SharedUIDContexts(ae.supported_contexts), evt_handlers=handlers,
                                     ssl_context=dicom_server_context(tls) if tls else None,
                                     server_class=Listener if listen else HandedListener)
        if fast:  # pynetdicom's debug log shows each PDU only on its own path
            self.server.store = self.store
        if listen:
            threading.Thread(target=self.server.serve_forever, name="dicom-listener", daemon=True).start()
            log.info("listening as %s on %s:%d%s", self.cfg.node.ae_title, *addr, " (DICOM TLS)" if tls else "")
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.warning("association from %s:%s rejected: calling AE %r, called AE %r (accepted calling AEs: %s; "
                    "this node is %r)", req.address, req.port, req.ae_title, event.assoc.acceptor.ae_title,
                    ", ".join(self.cfg.accept.calling_ae_titles) or "any", self.cfg.node.ae_title)
        self.audit.write("rejected", calling_ae=req.ae_title, address=req.address)
        self.metrics.inc("dicomnode_associations_rejected_total")

    def handle_store(self, event: evt.Event) -> int:
        """pynetdicom's EVT_C_STORE: the requests `dicomnode.cstore` leaves to pynetdicom."""
        return self.store(StoreRequest.from_event(event))

    def store(self, request: StoreRequest) -> int:
        """Store one received instance durably and return the C-STORE status (either receive path)."""
        t0 = time.perf_counter()
        status = self._store(request)
        outcome = "success" if status == SUCCESS else f"0x{status:04X}"
        self.metrics.inc("dicomnode_c_store_total", status=outcome)
        self.metrics.observe("dicomnode_c_store_seconds", time.perf_counter() - t0)
        return status

    def _store(self, request: StoreRequest) -> int:
        calling = request.calling_ae
        try:
            ds = request.dataset()
            ident = Identity.of(ds)
            if ident.sop_instance_uid != request.sop_instance_uid:
                log.warning("C-STORE from %s refused: the dataset's SOP Instance UID differs from the command's", calling)
                return SOP_MISMATCH
            _check_pixel_length(ds, UID(request.transfer_syntax))
            header = part10_header(ident.sop_class_uid, ident.sop_instance_uid, request.transfer_syntax, calling)
        except (InvalidInstance, TruncatedInstance) as e:
            log.warning("C-STORE from %s refused: %s", calling, e)
            self.audit.write("refused", calling_ae=calling, reason=str(e))
            return INVALID_UID if isinstance(e, InvalidInstance) else CANNOT_UNDERSTAND
        except Exception as e:  # a dataset pydicom cannot parse: truncated, corrupt
            log.warning("C-STORE from %s refused: the dataset cannot be decoded (%s)", calling, type(e).__name__)
            self.audit.write("refused", calling_ae=calling, reason=f"undecodable dataset ({type(e).__name__})")
            return CANNOT_UNDERSTAND
        try:
            outcome = self.storage.store((header, request.encoded), ident, lambda: routing_attributes(ds), calling)
        except OSError as e:
            log.error("C-STORE from %s failed: cannot write to storage (%s)", calling, e.strerror)
            return OUT_OF_RESOURCES
        self.audit.write("received", calling_ae=calling, study_uid=ident.study_uid, series_uid=ident.series_uid,
                         sop_instance_uid=ident.sop_instance_uid, outcome=outcome)
        if outcome != "duplicate":
            self.on_stored(ident)
        return SUCCESS
