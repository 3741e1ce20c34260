"""Serving the dashboard with uvicorn on a socket the caller bound."""

from __future__ import annotations

import signal
import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette


class _Server(uvicorn.Server):
    """uvicorn's server, stopping on SIGTERM/SIGINT and then returning, so that the command
    exits 0 (uvicorn re-raises the signal after its shutdown, which would end the process
    by the signal instead)."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: do not wait for open connections
        else:
            self.should_exit = True


def serve(app: Starlette, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or SIGINT. mailstrom's loggers say what
    happens (actions, refusals); uvicorn's access log is off."""
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        lifespan="on",
    )
    _Server(config).run(sockets=[sock])
