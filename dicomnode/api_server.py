"""Runs the API with uvicorn in a thread of the node, HTTP or HTTPS as configured.

The port is bound before the thread starts, so a port in use stops `serve` with a clear error
instead of a node without its API.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from dicomnode.config import ConfigError
from dicomnode.security import check_private

if TYPE_CHECKING:
    from dicomnode.node import Node


class ApiServer:
    def __init__(self, node: "Node", tokens: dict[str, str]):
        from dicomnode.api import create_app

        self.cfg = node.cfg.api
        if (self.cfg.certfile is None) != (self.cfg.keyfile is None):
            raise ConfigError("api: HTTPS needs both certfile and keyfile")
        if self.cfg.keyfile is not None:
            check_private(self.cfg.keyfile, "api.keyfile")
        self.app = create_app(node, tokens)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.cfg.certfile else 'http'}://{self.cfg.host}:{self.cfg.port}"

    def start(self, timeout: float = 15) -> "ApiServer":
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"api: cannot listen on {self.cfg.host}:{self.cfg.port} ({e.strerror}); "
                              "choose another api.port or set api.enabled: false") from None
        config = uvicorn.Config(self.app, log_config=None, access_log=False, log_level="warning",
                                ssl_certfile=str(self.cfg.certfile) if self.cfg.certfile else None,
                                ssl_keyfile=str(self.cfg.keyfile) if self.cfg.keyfile else None)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="api", daemon=True)
        self._thread.start()
        end = time.time() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.time() > end:
                raise ConfigError(f"api: the server on {self.url} did not start (see the log above)")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(10)
