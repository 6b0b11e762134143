"""C-STORE requests read straight from the P-DATA-TF PDUs, past pynetdicom's per-PDU objects.

For every PDU pynetdicom builds PDU and PDV objects, passes them through its state machine, copies
each fragment into a DIMSE message, decodes the command set with pydicom and queues the request
for the association's thread, which wakes to call the handler: with eight associations on two
cores that is the largest share of the node's interpreter time per instance left after
`dicomnode.reactor` (docs/BENCHMARKS.md). Here the DUL's thread reads a C-STORE request itself
(the command set is a handful of implicit VR little endian elements), gathers the data set's
fragments, calls the node's store handler and sends the response.

Only what is fully understood is taken: a C-STORE request whose command arrives whole on an
accepted context for the SOP class it names, while pynetdicom has no message of its own half
read. Everything else (C-ECHO, a fragmented or unusual command, a context that was not accepted)
goes through pynetdicom as before. A protocol violation in the middle of a taken request (a
command before the data set ended, another context) aborts the association, as pynetdicom would.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode

log = logging.getLogger("dicomnode.scp")

C_STORE_RQ, C_STORE_RSP, NO_DATA_SET = 0x0001, 0x8001, 0x0101
PROCESSING_FAILURE = 0xC211  # what pynetdicom answers when the handler raises
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
SMALLEST_PEER_PDU = 1024  # a peer that takes less gets its response from pynetdicom


class ProtocolError(ValueError):
    """The peer broke the DIMSE message rules in the middle of a request: the association is aborted."""


@dataclass
class StoreRequest:
    """One C-STORE request as the node's handler needs it, from either receive path."""

    calling_ae: str
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    encoded: bytes  # the data set as received, in `transfer_syntax`
    _dataset: Dataset | None = field(default=None, repr=False)

    @classmethod
    def from_event(cls, event: Any) -> StoreRequest:
        """pynetdicom's EVT_C_STORE (the requests this module leaves to pynetdicom)."""
        req = event.request
        return cls(event.assoc.requestor.ae_title, int(req.MessageID), str(req.AffectedSOPClassUID),
                   str(req.AffectedSOPInstanceUID), str(event.context.transfer_syntax),
                   event.encoded_dataset(include_meta=False))

    def dataset(self) -> Dataset:
        """The decoded data set (pydicom reads elements lazily; raises on what it cannot parse)."""
        if self._dataset is None:
            ts = UID(self.transfer_syntax)
            self._dataset = decode(BytesIO(self.encoded), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
        return self._dataset


def _command_element(element: int, value: bytes) -> bytes:
    """One group-0000 element, implicit VR little endian (a UID padded with NUL to even length)."""
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def c_store_rsp(sop_class_uid: str, message_id: int, status: int, sop_instance_uid: str) -> bytes:
    """The command set of a C-STORE response that carries only a status (PS3.7 9.3.1.2)."""
    body = b"".join([
        _command_element(0x0002, sop_class_uid.encode("ascii")),
        _command_element(0x0100, struct.pack("<H", C_STORE_RSP)),
        _command_element(0x0120, struct.pack("<H", message_id)),
        _command_element(0x0800, struct.pack("<H", NO_DATA_SET)),
        _command_element(0x0900, struct.pack("<H", status)),
        _command_element(0x1000, sop_instance_uid.encode("ascii")),
    ])
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def p_data_tf(context_id: int, control: int, fragment: bytes) -> bytes:
    """One P-DATA-TF PDU holding one presentation data value (PS3.8 9.3.5)."""
    return struct.pack(">BBIIBB", 0x04, 0, len(fragment) + 6, len(fragment) + 2, context_id, control) + fragment


def command_elements(data: bytes | memoryview) -> dict[int, bytes] | None:
    """Group-0000 elements by element number, or None where the bytes are not a plain command set."""
    out: dict[int, bytes] = {}
    i = 0
    while i + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, i)
        i += 8
        if group != 0 or i + length > len(data):
            return None
        out[element] = bytes(data[i:i + length])
        i += length
    return out if i == len(data) else None


def _uid(value: bytes) -> str:
    return value.rstrip(b"\0 ").decode("ascii")


def _us(value: bytes | None) -> int | None:
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def pdv_items(body: memoryview) -> list[tuple[int, int, memoryview]] | None:
    """(context ID, message control header, fragment) of each item of a P-DATA-TF PDU's body, or
    None where the items do not add up to the body."""
    items = []
    i = 0
    while i < len(body):
        if i + 6 > len(body):
            return None
        (length,) = struct.unpack_from(">I", body, i)
        if length < 2 or i + 4 + length > len(body):
            return None
        items.append((body[i + 4], body[i + 5], body[i + 6:i + 4 + length]))
        i += 4 + length
    return items


@dataclass
class _Pending:
    context_id: int
    request: StoreRequest
    fragments: list[memoryview] = field(default_factory=list)


class CStoreReader:
    """One association's C-STORE requests, read by its DUL thread (`take`, one PDU at a time)."""

    def __init__(self, assoc: Any, store: Callable[[StoreRequest], int], send: Callable[[bytes], None]) -> None:
        self.assoc, self.store, self.send = assoc, store, send
        self.pending: _Pending | None = None

    def take(self, body: memoryview) -> bool:
        """Handle one P-DATA-TF PDU (the bytes after its 6-byte header). False: not taken, pynetdicom
        decodes it. Raises ProtocolError for a violation in the middle of a taken request."""
        items = pdv_items(body)
        if self.pending is None:
            # a request's command, then (in the same PDU) only its data set, or pynetdicom decides what this is
            if not items or any(cid != items[0][0] or control & COMMAND for cid, control, _ in items[1:]) \
                    or not self._start(items[0]):
                return False
            items = items[1:]
        elif items is None:
            raise ProtocolError("a P-DATA-TF PDU whose items do not add up to its length")
        pending = self.pending
        assert pending is not None
        for n, (cid, control, fragment) in enumerate(items):
            if control & COMMAND or cid != pending.context_id:
                raise ProtocolError("a new message or another context before the data set of a C-STORE request ended")
            pending.fragments.append(fragment)
            if control & LAST:
                if n != len(items) - 1:
                    raise ProtocolError("more data after the last fragment of a C-STORE request's data set")
                self._finish(pending)
        return True

    def _start(self, item: tuple[int, int, memoryview]) -> bool:
        """Begin a request from a PDU's first item if it is a whole C-STORE-RQ command this path can serve."""
        cid, control, fragment = item
        if control != COMMAND | LAST or self.assoc.dimse.message is not None:
            return False
        peer_max = self.assoc.requestor.maximum_length
        cx = self.assoc._accepted_cx.get(cid)
        cmd = command_elements(fragment)
        if cx is None or cmd is None or (peer_max and peer_max < SMALLEST_PEER_PDU):
            return False
        message_id, data_set_type = _us(cmd.get(0x0110)), _us(cmd.get(0x0800))
        if _us(cmd.get(0x0100)) != C_STORE_RQ or message_id is None or data_set_type in (None, NO_DATA_SET) \
                or 0x0002 not in cmd or 0x1000 not in cmd:
            return False
        try:
            sop_class, sop_instance = _uid(cmd[0x0002]), _uid(cmd[0x1000])
        except UnicodeDecodeError:
            return False
        if sop_class != cx.abstract_syntax:
            return False
        request = StoreRequest(self.assoc.requestor.ae_title, message_id, sop_class, sop_instance,
                               str(cx.transfer_syntax[0]), b"")
        self.pending = _Pending(cid, request)
        return True

    def _finish(self, pending: _Pending) -> None:
        self.pending = None
        request = pending.request
        request.encoded = b"".join(pending.fragments)
        pending.fragments.clear()
        try:
            status = self.store(request)
        except Exception:
            log.exception("C-STORE from %s: storing failed, answered 0x%04X (processing failure)", request.calling_ae,
                          PROCESSING_FAILURE)
            status = PROCESSING_FAILURE
        rsp = c_store_rsp(request.sop_class_uid, request.message_id, status, request.sop_instance_uid)
        self.send(p_data_tf(pending.context_id, COMMAND | LAST, rsp))
