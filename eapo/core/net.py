"""Loopback ports for the servers a process starts (tests, the embedded stack, torch rendezvous)."""

from __future__ import annotations

import os
import socket

# Ports handed out below the kernel's ephemeral range (32768+ on Linux): a port from bind(0) can be
# taken by any outgoing connection (Redis clients, torch's TCPStore) before the server that was meant
# to have it binds it. Each process starts at its own offset so parallel processes rarely collide.
_PORT_LOW, _PORT_HIGH = 20000, 32768
_next_port = _PORT_LOW + (os.getpid() * 97) % (_PORT_HIGH - _PORT_LOW)


def free_port() -> int:
    """A loopback port that is free now and outside the ephemeral range; never the same twice per process."""
    global _next_port
    for _ in range(_PORT_HIGH - _PORT_LOW):
        port, _next_port = _next_port, _PORT_LOW + (_next_port + 1 - _PORT_LOW) % (_PORT_HIGH - _PORT_LOW)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in [{_PORT_LOW}, {_PORT_HIGH})")
