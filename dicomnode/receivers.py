"""Extra receiver processes for the node's port (`node.receivers` > 1).

One Python process receives eight associations at once no faster than one: the interpreter lock
serialises them (docs/BENCHMARKS.md). The main process accepts every connection and passes each
new one (its file descriptor, before a byte is read) to whichever process has the fewest open
associations, itself included, ties to a receiver: eight associations over two processes are four
and four (SO_REUSEPORT, tried first, spread them by an address hash: 3/5, 2/6). Each receiver runs
the same C-STORE handling, writes to the same storage and SQLite index, and tells the main process
what it stored and counted, and when an association ended, so that the assembler and `/metrics`
see every instance. A receiver that exits is started again; receivers end with the main process,
even when that is killed.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle
from pathlib import Path
from typing import Any, Callable

from dicomnode.audit import Audit
from dicomnode.config import NodeConfig
from dicomnode.metrics import Metrics
from dicomnode.scp import StoreSCP
from dicomnode.storage import Identity, Storage

log = logging.getLogger("dicomnode.receivers")
PR_SET_PDEATHSIG = 1


class ForwardedMetrics(Metrics):
    """A receiver's counters, sent to the main process rather than kept."""

    def __init__(self, send: Callable[[tuple], None]) -> None:
        super().__init__()
        self._send = send

    def inc(self, metric: str, amount: float = 1, **labels: str) -> None:
        self._send(("inc", metric, amount, labels))

    def observe(self, metric: str, seconds: float, **labels: str) -> None:
        self._send(("observe", metric, seconds, labels))


def receive(cfg: NodeConfig, conn: Connection, handoffs: Connection) -> None:
    """A receiver process: serves the connections the main process passes over `handoffs`,
    reporting to the main process over `conn`."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # end with the main process, even on SIGKILL
    if os.getppid() != multiprocessing.parent_process().pid:  # it ended before the line above
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:  # association threads share the pipe
            conn.send(message)

    root = Path(cfg.node.storage).resolve()
    storage, audit = Storage(root, cfg.accept.duplicates), Audit(root / "audit.jsonl")
    scp = StoreSCP(cfg, storage, audit, lambda ident: send(("stored", ident)), ForwardedMetrics(send))
    server = scp.start(listen=False)
    server.on_closed = lambda: send(("closed",))
    threading.Thread(target=_take_connections, args=(server, handoffs, stop), name="handoffs", daemon=True).start()
    log.info("receiving associations that the node (pid %d) passes over", os.getppid())
    send(("ready",))
    stop.wait()
    scp.stop()
    storage.close()
    audit.close()


def _take_connections(server: Any, handoffs: Connection, stop: threading.Event) -> None:
    while True:
        try:
            fd = recv_handle(handoffs)
        except (EOFError, OSError):  # the main process has gone
            stop.set()
            return
        try:
            server.take(socket.socket(fileno=fd))
        except Exception:  # one connection lost, not the receiver
            log.exception("a connection passed over by the node could not be served")


class Receivers:
    """The extra receiver processes of a node, and the threads that relay what they report."""

    def __init__(self, cfg: NodeConfig, on_stored: Callable[[Identity], None], metrics: Metrics) -> None:
        self.cfg, self.on_stored, self.metrics = cfg, on_stored, metrics
        self._context = multiprocessing.get_context("spawn")  # no copy of the main process's threads
        self._processes: dict[int, Any] = {}
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._handoffs: dict[int, Connection] = {}  # receivers ready for connections
        self._open: dict[int, int] = {}  # associations passed to each and not ended yet

    def start(self, n: int) -> "Receivers":
        for i in range(n):
            threading.Thread(target=self._run, args=(i,), name=f"receiver-{i}", daemon=True).start()
        return self

    def _run(self, i: int) -> None:
        """Start receiver `i`, relay what it reports until it exits, start it again. One thread
        all along: a receiver ends when the thread that started it does (PR_SET_PDEATHSIG)."""
        delay = 1.0
        while not self._stopping.is_set():
            reader, writer = self._context.Pipe(duplex=False)
            ours, theirs = self._context.Pipe(duplex=True)  # a socket pair: it carries file descriptors
            process = self._context.Process(target=receive, args=(self.cfg, writer, theirs), name=f"dicomnode-receiver-{i}",
                                            daemon=True)
            started = time.monotonic()
            process.start()
            writer.close()
            theirs.close()
            self._processes[i] = process
            self._relay(i, reader, ours)
            with self._lock:
                self._handoffs.pop(i, None)
                self._open.pop(i, None)
            ours.close()
            process.join()
            if self._stopping.is_set():
                return
            self.metrics.inc("dicomnode_receiver_restarts_total")
            delay = 1.0 if time.monotonic() - started > 60 else min(2 * delay, 60.0)  # one that keeps failing: back off
            log.error("receiver process %d (pid %d) exited with code %s: starting it again in %.0f s; associations it had "
                      "open were cut, instances it had acknowledged are stored", i, process.pid, process.exitcode, delay)
            self._stopping.wait(delay)

    def running(self) -> int:
        return sum(p.is_alive() for p in self._processes.values())

    def open_associations(self) -> list[int]:
        """Open associations of each running receiver, as the main process counts them."""
        with self._lock:
            return [self._open[i] for i in sorted(self._open)]

    def handoff(self, sock: socket.socket, local_open: int) -> bool:
        """Pass a connection the main process has just accepted to the receiver with the fewest
        open associations, unless the main process (`local_open`) has fewer. False: keep it."""
        with self._lock:
            ranked = sorted((n, i) for i, n in self._open.items())
        for n, i in ranked:
            if n > local_open:
                return False
            with self._lock:
                conn = self._handoffs.get(i)
                if conn is None:  # it has just exited
                    continue
                self._open[i] += 1
            try:
                send_handle(conn, sock.fileno(), self._processes[i].pid)
                return True
            except OSError:
                with self._lock:
                    if i in self._open:
                        self._open[i] -= 1
        return False

    def _relay(self, i: int, conn: Connection, handoffs: Connection) -> None:
        with self._lock:
            self._open[i] = 0
        while True:
            try:
                kind, *rest = conn.recv()
            except (EOFError, OSError):
                return
            if kind == "ready":
                with self._lock:
                    self._handoffs[i] = handoffs
            elif kind == "closed":
                with self._lock:
                    self._open[i] -= 1
            elif kind == "stored":
                self.on_stored(rest[0])
            elif kind == "inc":
                self.metrics.inc(rest[0], rest[1], **rest[2])
            elif kind == "observe":
                self.metrics.observe(rest[0], rest[1], **rest[2])

    def stop(self) -> None:
        self._stopping.set()
        for process in self._processes.values():
            process.terminate()
        for process in self._processes.values():
            process.join(timeout=20)
