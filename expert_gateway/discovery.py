"""Backends from DNS: a Kubernetes headless Service resolves to one address per ready pod.

Every ``discovery_interval_s`` each configured name is resolved again (without blocking the event
loop); new addresses join the pool, vanished ones are drained (in-flight requests finish) and then
removed. A failed lookup changes nothing: a DNS hiccup must not empty a pool.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from eapo.core.config import DnsPool

log = logging.getLogger(__name__)


async def resolve(entry: DnsPool) -> set[str]:
    """The backend URLs ``entry`` resolves to now."""
    infos = await asyncio.get_running_loop().getaddrinfo(entry.host, entry.port, type=socket.SOCK_STREAM)
    urls = set()
    for family, *_, sockaddr in infos:
        host = f"[{sockaddr[0]}]" if family == socket.AF_INET6 else sockaddr[0]
        urls.add(f"{entry.scheme}://{host}:{entry.port}")
    return urls


async def discovered(entries: list[DnsPool]) -> dict[tuple[str, str], DnsPool] | None:
    """(model, url) → its entry, for every configured name; None when any lookup failed."""
    found: dict[tuple[str, str], DnsPool] = {}
    for entry in entries:
        try:
            urls = await resolve(entry)
        except OSError as exc:
            log.warning("discovery: cannot resolve %s (%s); keeping the current backends", entry.host, exc)
            return None
        found |= {(entry.model, url): entry for url in urls}
    return found
