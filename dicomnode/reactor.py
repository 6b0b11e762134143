"""Event-driven waits for the listener's associations, in place of pynetdicom's polling.

pynetdicom (3.0) runs two threads per association that poll: the DUL checks its socket and
queues every millisecond, the association checks for a complete DIMSE message every millisecond.
With eight associations that is sixteen threads waking 1,000 times a second, each taking the
interpreter lock: about a quarter of the receiver's CPU per instance (`bench/bench_receive.py`).
Here the DUL waits in `select()` on its socket and a wake-up socket poked when there is something
to send, and the association waits on an event set when a message, a release or an abort
arrives. Both still wake every `IDLE_WAIT` seconds for their timers (ARTIM, network timeout).
Reads take up to `RECV_CHUNK` bytes per call instead of 4 KiB; allocation still grows only as
data arrives, so a PDU that claims gigabytes costs nothing until they are sent. A plain C-STORE
response (a status, no comment) is encoded here in a few microseconds; pynetdicom builds and encodes
a pydicom dataset for it, twice for the group length (~0.5 ms per instance). With a `store`
handler the DUL reads C-STORE requests itself (`dicomnode.cstore`).

pynetdicom builds these objects inside its request handler; `EventDrivenRequestHandler` upgrades
them in place before the association starts (the subclasses add methods, no state of their own
beyond what `make_event_driven` sets).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicomnode.cstore import CStoreReader, ProtocolError, StoreRequest, c_store_rsp

IDLE_WAIT = 0.05
LOOP_DELAY = 0.001  # pynetdicom's
QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
RECV_CHUNK = 1 << 18
LOGGER = logging.getLogger("dicomnode.scp")


class NotifyingQueue(queue.Queue):
    """A queue that calls `notify` after each put (under the queue's lock: `notify` must not block)."""

    def __init__(self, notify: Callable[[], Any]) -> None:
        super().__init__()
        self._notify = notify

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._notify()


class EventDrivenDUL(DULServiceProvider):
    """Waits for the peer's data or a local primitive instead of sleeping a millisecond per loop."""

    _wake_r: socket.socket
    _wake_w: socket.socket
    cstore: CStoreReader | None = None

    def poke(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # full (already poked) or closed (the reactor has ended)
            pass

    def kill_dul(self) -> None:
        super().kill_dul()
        self.poke()

    def run_reactor(self) -> None:
        try:
            super().run_reactor()
        finally:
            self._wake_r.close()
            self._wake_w.close()

    def _is_transport_event(self) -> bool:
        """Called when there is nothing to send: wait until the peer sends or a primitive is queued."""
        self._run_loop_delay = LOOP_DELAY  # the reactor sleeps this long after a pass that queued no event
        sock = self.socket.socket if self.socket is not None else None
        idle = self.event_queue.empty() and self.to_provider_queue.empty() and not self._kill_thread
        if idle and sock is not None and not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            # Sta1 (connection closed): only a stop is to come, and `stop_dul` sets its flag unpoked.
            timeout = 0.001 if self.state_machine.current_state == "Sta1" else IDLE_WAIT
            try:
                ready, _, _ = select.select([sock, self._wake_r], [], [], timeout)
            except (OSError, ValueError):  # closed under us: the check below reports it
                ready = []
            if self._wake_r in ready:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
        return super()._is_transport_event()

    def _read_pdu_data(self) -> None:
        """Once the association is established, hand each P-DATA-TF PDU to the C-STORE reader first
        (`dicomnode.cstore`); what it does not take is decoded by pynetdicom, as before. The rest of
        a request it took is read here, PDU after PDU, without going back through the reactor's
        waits (three system calls and interpreter-lock hand-overs fewer per PDU)."""
        if self.cstore is None or self.state_machine.current_state != "Sta6":
            super()._read_pdu_data()
            return
        while True:
            pdu = self._read_pdu_bytes()
            if pdu is None:
                return
            if pdu[0] != 0x04:
                break
            try:
                if not self.cstore.take(memoryview(pdu)[6:]):
                    break
            except ProtocolError as e:
                LOGGER.error("association from %s aborted: %s", self.assoc.requestor.ae_title, e)
                self.event_queue.put("Evt19")  # invalid PDU: A-ABORT, as pynetdicom does
                return
            if self.cstore.pending is None or self._kill_thread:
                self._run_loop_delay = 0  # no event queued, yet the next request may be waiting
                return
            self._idle_timer.restart()
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as e:
            LOGGER.error("association from %s: a PDU could not be decoded (%s)", self.assoc.requestor.ae_title, e)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _read_pdu_bytes(self) -> bytearray | None:
        """One whole PDU from the socket, checked as pynetdicom checks it; None once the event that
        ends the association (connection closed: Evt17, unknown PDU type: Evt19) is queued."""
        assert self.socket is not None
        try:
            pdu = self.socket.recv(6)
            if len(pdu) < 6:
                self.event_queue.put("Evt17")
                return None
            pdu_type, _, length = struct.unpack(">BBL", pdu)
            if pdu_type not in range(0x01, 0x08):
                LOGGER.error("association from %s: unknown PDU type 0x%02X", self.assoc.requestor.ae_title, pdu_type)
                self.event_queue.put("Evt19")
                return None
            pdu += self.socket.recv(length)
        except OSError:  # reset, or the network timeout
            pdu = bytearray()
            length = -1
        if len(pdu) != 6 + length:
            LOGGER.error("association from %s: the connection closed before the whole PDU arrived", self.assoc.requestor.ae_title)
            self.event_queue.put("Evt17")
            return None
        return pdu


class EventDrivenDIMSE(DIMSEServiceProvider):
    """The association's non-blocking look for a message waits (briefly) for one to arrive."""

    _arrived: threading.Event

    def get_msg(self, block: bool = False) -> Any:
        if not block and self.msg_queue.empty():
            self._arrived.wait(IDLE_WAIT)
            self._arrived.clear()
        return super().get_msg(block)

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = c_store_rsp_command(primitive)
        if encoded is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT) or len(encoded) + 6 > (self.maximum_pdu_size or 1 << 32):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))  # command, last fragment
        self.dul.send_pdu(pdata)


def c_store_rsp_command(rsp: Any) -> bytes | None:
    """The command set of a C-STORE response that carries only a status, or None for any other
    message (pynetdicom encodes those)."""
    if not isinstance(rsp, C_STORE) or None in (rsp.MessageIDBeingRespondedTo, rsp.Status, rsp.AffectedSOPClassUID,
                                                rsp.AffectedSOPInstanceUID) or rsp.ErrorComment or rsp.OffendingElement:
        return None
    return c_store_rsp(str(rsp.AffectedSOPClassUID), rsp.MessageIDBeingRespondedTo, rsp.Status,
                       str(rsp.AffectedSOPInstanceUID))


class ChunkedSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes` (fewer if the peer closes), up to `RECV_CHUNK` per call.

        While a PDU is only partly here, ACK at once: a sender with Nagle's algorithm on (DCMTK's
        default) holds back the small rest of a PDU until what it sent before is acknowledged,
        and Linux delays that ACK by up to 40 ms (docs/BENCHMARKS.md)."""
        out = bytearray()
        while len(out) < nr_bytes and self.socket is not None:
            if out and QUICKACK is not None:
                try:
                    self.socket.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                except OSError:
                    pass
            chunk = self.socket.recv(min(RECV_CHUNK, nr_bytes - len(out)))
            if not chunk:
                break
            out += chunk
        return out


def make_event_driven(assoc: Association, store: Callable[[StoreRequest], int] | None = None) -> None:
    """Upgrade a not yet started acceptor association (its DUL, DIMSE provider and socket); with
    `store`, its DUL thread reads C-STORE requests itself and calls `store` for each."""
    arrived = threading.Event()
    dul, dimse = assoc.dul, assoc.dimse
    dul.__class__, dimse.__class__ = EventDrivenDUL, EventDrivenDIMSE
    dul._wake_r, dul._wake_w = socket.socketpair()
    dul._wake_w.setblocking(False)
    dul.to_provider_queue = NotifyingQueue(dul.poke)
    dul.to_user_queue = NotifyingQueue(arrived.set)  # a release or abort from the peer
    dimse._arrived = arrived
    dimse.msg_queue = NotifyingQueue(arrived.set)
    if isinstance(dul.socket, AssociationSocket):
        dul.socket.__class__ = ChunkedSocket
    if store is not None:
        dul.cstore = CStoreReader(assoc, store, lambda pdu: dul.socket.send(pdu))  # type: ignore[union-attr]
    machine = dul.state_machine
    move = machine.transition

    def transition(state: str) -> None:
        if machine.current_state == "Sta2" and state == "Sta1":
            # Closed or timed out before an association request (a port probe): the association would
            # wait its ACSE timeout (30 s) for a request; an empty primitive ends it now.
            dul.to_user_queue.put(None)
        move(state)

    machine.transition = transition  # type: ignore[method-assign]


class EventDrivenRequestHandler(RequestHandler):
    """Also tells the listener when the association's thread ends, however it ends (release,
    abort, rejection, timeout): the listener counts open associations to spread new ones."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        make_event_driven(assoc, getattr(self.server, "store", None))
        run, server = assoc.run, self.server

        def run_then_report() -> None:
            try:
                run()
            finally:
                server.association_ended()  # type: ignore[attr-defined]

        assoc.run = run_then_report  # type: ignore[method-assign]
        return assoc
