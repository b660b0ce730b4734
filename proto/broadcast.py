"""Weight versions by collective broadcast (NCCL on GPUs, gloo on CPU), for a fixed-size pool of policy
servers: the option beside loading each version from shared storage.

The learner is rank 0 of a standalone process group (its own ``TCPStore``, so it touches neither
DeepSpeed's nor vLLM's default group); the policy servers' workers are ranks 1..N. A version goes out as
a header (its number and the names, dtypes and shapes of its tensors, as JSON) and then one broadcast
per tensor, in that order. Storage stays the source of truth: the learner writes every version first,
a new or restarted server loads from there, and since a collective needs every rank, a broadcast that
fails (a server died) ends the broadcast path for the run — the pool is fixed-size by construction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist

Backend = Literal["gloo", "nccl"]
STORE_PREFIX = "eapo-weights"


@dataclass
class Group:
    pg: Any  # torch.distributed.ProcessGroupGloo / ProcessGroupNCCL
    rank: int
    world_size: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Rank 0's ``tensor`` into every rank's (in place)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([tensor], opts).wait()


def join(address: str, rank: int, world_size: int, backend: Backend = "gloo", timeout_s: float = 300.0) -> Group:
    """Join the group at ``host:port`` (rank 0 serves the store there). Blocks until all ``world_size``
    ranks have joined, or raises after ``timeout_s``."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"broadcast address must be host:port, got {address!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(STORE_PREFIX, store)
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size)
    else:
        device = torch.device("cpu")
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    return Group(pg, rank, world_size, device)


def send(group: Group, version: int, tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0: version ``version`` to every other rank."""
    layout = [[name, str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()]
    meta = json.dumps({"version": version, "tensors": layout}).encode()
    header = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
    group.broadcast(torch.tensor([header.numel()], dtype=torch.int64, device=group.device))
    group.broadcast(header.to(group.device))
    for t in tensors.values():
        group.broadcast(t.detach().to(group.device).contiguous())


def receive(group: Group) -> tuple[int, dict[str, torch.Tensor]]:
    """Ranks 1..N: the next version rank 0 sends, as (version, tensors on this rank's device)."""
    size = torch.zeros(1, dtype=torch.int64, device=group.device)
    group.broadcast(size)
    header = torch.zeros(int(size.item()), dtype=torch.uint8, device=group.device)
    group.broadcast(header)
    meta = json.loads(bytes(header.cpu().numpy()).decode())
    tensors = {}
    for name, dtype, shape in meta["tensors"]:
        tensors[name] = torch.empty(shape, dtype=getattr(torch, dtype), device=group.device)
        group.broadcast(tensors[name])
    return int(meta["version"]), tensors
