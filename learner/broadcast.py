"""The learner's side of the broadcast option (``learner.broadcast``): rank 0 of ``proto.broadcast``'s
group, driving the policy servers' side over their dev-mode ``/collective_rpc`` (vLLM's worker
extension, or the CPU server). Storage stays the source of truth: a version is written before it is
broadcast, and when the group cannot form or a broadcast fails the path turns off for the run and the
servers load versions from storage, as the rollout asks them to anyway."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import aiohttp

from eapo.core.config import BroadcastConfig
from proto.broadcast import Group, join, send
from proto.weights import load_tensors

log = logging.getLogger(__name__)


class Broadcaster:
    def __init__(self, cfg: BroadcastConfig):
        self.cfg = cfg
        self.group: Group | None = None

    @property
    def world_size(self) -> int:
        return 1 + len(self.cfg.servers) * self.cfg.ranks_per_server

    async def _call(self, session: aiohttp.ClientSession, url: str, method: str, *args: object) -> None:
        async with session.post(f"{url.rstrip('/')}/collective_rpc", json={"method": method, "args": list(args)}) as r:
            if r.status != 200:
                raise RuntimeError(f"{url}: {method}: HTTP {r.status}: {(await r.text())[:300]}")

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s + 10))

    async def start(self) -> None:
        """Form the group: every server's workers join while rank 0 does."""
        c = self.cfg
        try:
            async with self._session() as session:
                joins = [
                    self._call(session, url, "eapo_join_broadcast", c.address, 1 + i * c.ranks_per_server,
                               self.world_size, c.backend, c.timeout_s)
                    for i, url in enumerate(c.servers)
                ]  # fmt: skip
                rank0 = asyncio.to_thread(join, c.address, 0, self.world_size, c.backend, c.timeout_s)
                self.group, *_ = await asyncio.gather(rank0, *joins)
            log.info("weight broadcast to %d policy servers (%s, %s)", len(c.servers), c.backend, c.address)
        except Exception as exc:  # the run goes on with storage
            log.error("weight broadcast off: the group did not form (%s); servers load from storage", exc)

    async def send(self, version: int, path: Path) -> bool:
        """Broadcast published version ``version`` (at ``path``); True if every server took it."""
        if self.group is None:
            return False
        try:
            tensors = await asyncio.to_thread(load_tensors, path)
            async with self._session() as session:
                receives = [self._call(session, url, "eapo_receive_broadcast") for url in self.cfg.servers]
                await asyncio.gather(asyncio.to_thread(send, self.group, version, tensors), *receives)
        except Exception as exc:  # a server died: a collective cannot go on without it
            self.group = None
            log.error("weight broadcast of version %d failed (%s); off for this run, storage serves", version, exc)
            return False
        return True
