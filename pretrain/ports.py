"""Free loopback ports, a leaf without torch: `pretrain launch` picks its rendezvous port here before it starts any
training process, so the launcher itself never pays torch's import."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago (a rendezvous port for a local group or a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
