"""Which node each rank runs on: gathered once at set-up, written to plan.json, used to name a lost node.

A node is the set of ranks one launcher started: ranks with the same host name, the same node rank from the
launcher's environment (DeepSpeed's `CROSS_RANK`, torchrun's `GROUP_RANK`) and the same parent process (the
launcher, or torchrun's agent). The parent tells two "nodes" of one machine apart (loopback tests); on a cluster
the host name does. Nodes are numbered by their lowest global rank.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def node_key() -> str:
    """This process's node identity (host, the launcher's node rank, the launcher's pid)."""
    node_rank = os.environ.get("CROSS_RANK", os.environ.get("GROUP_RANK", "?"))
    return f"{socket.gethostname()}|{node_rank}|{os.getppid()}"


def span(ranks: list[int]) -> str:
    """'3', '2-3' or '1, 4' for a sorted list of ranks."""
    if len(ranks) > 1 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ", ".join(map(str, ranks))


@dataclass(frozen=True)
class Topology:
    nodes: tuple[tuple[int, ...], ...]  # global ranks of each node, nodes ordered by their lowest rank
    hosts: tuple[str, ...]  # host name of each node
    master_addr: str

    @classmethod
    def from_keys(cls, keys: list[str], master_addr: str) -> "Topology":
        """From every rank's `node_key()` (index = global rank)."""
        by_key: dict[str, list[int]] = {}
        for rank, key in enumerate(keys):
            by_key.setdefault(key, []).append(rank)
        order = sorted(by_key, key=lambda k: by_key[k][0])
        return cls(tuple(tuple(by_key[k]) for k in order), tuple(k.split("|")[0] for k in order), master_addr)

    def node_of(self, rank: int) -> int:
        return next(i for i, ranks in enumerate(self.nodes) if rank in ranks)

    def describe(self, missing: list[int]) -> str:
        """'node 1 (host h, rank 1)' for each node with missing ranks ('ranks 2 of node 1 ...' when only some)."""
        parts = []
        for i, ranks in enumerate(self.nodes):
            gone = [r for r in ranks if r in missing]
            if not gone:
                continue
            what = f"rank{'s' if len(gone) > 1 else ''} {span(gone)}"
            parts.append(f"node {i} (host {self.hosts[i]}, {what})" if len(gone) == len(ranks)
                         else f"{what} of node {i} (host {self.hosts[i]})")
        return " and ".join(parts)

    def plan(self) -> dict:
        """The facts plan.json records."""
        return {"nodes": len(self.nodes), "ranks_per_node": [len(r) for r in self.nodes], "hosts": list(self.hosts),
                "master_addr": self.master_addr}


def gather(world: int) -> Topology:
    """Every rank's node (collective: all ranks call it at the same point, once, at set-up)."""
    import torch.distributed as dist

    keys = [node_key()]
    if world > 1:
        keys = [None] * world
        dist.all_gather_object(keys, node_key())
    return Topology.from_keys(keys, os.environ.get("MASTER_ADDR", "127.0.0.1"))
