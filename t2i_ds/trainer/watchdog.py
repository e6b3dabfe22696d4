"""Heartbeat watchdog: a lost or hung node ends the run within seconds, with one line naming it.

Without it a killed node ends the survivors with gloo's "Connection closed by peer" traceback, and a hung one
(SIGSTOP: what a dead NIC, a wedged GPU or a frozen host looks like from outside) leaves them waiting silently
for the backend's timeout (gloo 30 min, NCCL 10 min by default).

Every rank runs one daemon thread that, every `interval` seconds, bumps its own counter in the rendezvous store
(the TCPStore at MASTER_ADDR:MASTER_PORT that torch.distributed's init already uses; its own client connection,
so the training's own store traffic is never blocked behind it) and reads every rank's counter (one `multi_get`).
A rank whose counter has not moved for `train.collective_timeout_s` is lost. A thread beats even while its main
thread waits in a collective or computes (torch releases the GIL), so a slow rank is never taken for a lost one;
a SIGKILLed or SIGSTOPped process stops beating at once.

  * Hung node: the survivors' collectives time out after the same timeout (given to the process group at init,
    honoured by gloo and NCCL); the watchdog names the silent ranks at timeout + at most 2 intervals.
  * Killed node: a survivor's collective fails at once (connection closed); its main thread hands the failure
    to `failed()`, which shortens the limit to 3 intervals, so the line comes within a few seconds.
  * The store itself gone (the node hosting it, node 0, killed or hung): node 0 is named.

Then the lowest surviving rank removes the checkpoint directory being written, if any (never a complete one),
and prints one line naming the missing ranks and their node and the last complete checkpoint; every survivor
exits with status 3 (`os._exit`: the process group cannot be torn down cleanly without its peers).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

from t2i_ds.cli import is_user_error
from t2i_ds.trainer.topology import Topology

EXIT_NODE_LOST = 3
PREFIX = "t2i_ds/heartbeat/"


def interval_for(timeout_s: float) -> float:
    """Seconds between beats: a sixth of the timeout, within [0.2, 5]."""
    return min(max(timeout_s / 6, 0.2), 5.0)


def store_client(timeout_s: float):
    """A new client of the rendezvous store (its own connection); a request fails after `timeout_s`."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=timeout_s), wait_for_workers=False)


class Watchdog:
    """Started by the trainer once every rank is in the process group (world > 1); `close()` stops it."""

    def __init__(self, rank: int, topology: Topology, timeout_s: float, last_checkpoint: Callable[[], str],
                 cleanup: Callable[[], None], store=None, exit: Callable[[int], None] = os._exit):
        self.rank, self.topology, self.timeout = rank, topology, timeout_s
        self.world = sum(len(r) for r in topology.nodes)
        self.interval = interval_for(timeout_s)
        self.last_checkpoint, self.cleanup, self._exit = last_checkpoint, cleanup, exit
        self.keys = [f"{PREFIX}{r}" for r in range(self.world)]
        self.store = store if store is not None else store_client(2 * self.interval)
        self.store.add(self.keys[rank], 1)  # the first beat, before the next collective: every key exists soon
        self.peer_failed = threading.Event()  # a collective failed on this rank: a peer is probably gone
        self._stop = threading.Event()
        self.verdict: str | None = None  # the line, once a rank is declared lost (tests read it)
        self.thread = threading.Thread(target=self._run, name="t2i_ds-heartbeat", daemon=True)
        self.thread.start()

    # ---- the thread -----------------------------------------------------------------------------
    def _read(self) -> list[int]:
        if self.store.check(self.keys):
            return [int(v) for v in self.store.multi_get(self.keys)]
        return [self.store.add(k, 0) for k in self.keys]  # some rank has not beaten yet (start-up only)

    def limit(self) -> float:
        return min(self.timeout, 3 * self.interval) if self.peer_failed.is_set() else self.timeout

    def _run(self) -> None:
        start = time.monotonic()
        seen: list[int | None] = [None] * self.world
        changed = [start] * self.world
        store_down: float | None = None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            if store_down is not None:  # a client whose connection broke never recovers it: wait, do not retry
                if now - store_down > self.limit():
                    addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
                    self._lost(list(self.topology.nodes[0]), now - store_down,
                               f"the rendezvous store at {addr} it hosts stopped answering")
                    return
                continue
            try:
                self.store.add(self.keys[self.rank], 1)
                values = self._read()
            except Exception:  # noqa: BLE001  (the store's node is gone or stopped; torch logs one warning)
                store_down = now
                continue
            for r, v in enumerate(values):
                if v != seen[r]:
                    seen[r], changed[r] = v, now
            missing = [r for r in range(self.world) if r != self.rank and now - changed[r] > self.limit()]
            if missing:
                self._lost(missing, max(now - changed[r] for r in missing), "no heartbeat")
                return

    def _lost(self, missing: list[int], age: float, what: str) -> None:
        after = " after a collective with it failed" if self.peer_failed.is_set() else ""
        self.verdict = (f"lost {self.topology.describe(missing)}: {what} for {age:.1f} s{after} "
                        f"(train.collective_timeout_s={self.timeout:g}); {self.last_checkpoint()}")
        survivors = [r for r in range(self.world) if r not in missing]
        if survivors and self.rank == survivors[0]:  # one line for the whole run
            try:
                self.cleanup()
            except Exception as e:  # noqa: BLE001  (the line matters more; say what is left)
                self.verdict += f" (removing the partial checkpoint failed: {e})"
            print(f"t2i_ds.train: error: {self.verdict}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self._exit(EXIT_NODE_LOST)

    # ---- the main thread -------------------------------------------------------------------------
    def failed(self, error: BaseException) -> None:
        """The main thread's collective failed with `error`: if a peer is gone, the watchdog names it and ends
        the process (this call does not return); returns when every rank still beats (a real error: re-raise)."""
        if not any(is_comm_failure(e) for e in _chain(error)):
            return  # a known (agreed) error or a bug of this rank: no node loss, re-raised at once
        self.peer_failed.set()  # a hung peer is silent for about the timeout already; a killed one gets 3 intervals
        self.thread.join(timeout=self.limit() + 2 * self.interval)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2 * self.interval + 1)


def is_comm_failure(error: BaseException) -> bool:
    """A collective or store failure: torch's DistError family (NCCL, store, network), or gloo's RuntimeError,
    whose message names its source file (".../gloo/transport/tcp/pair.cc:553] Connection closed by peer")."""
    import torch.distributed as dist

    if is_user_error(error):
        return False
    return isinstance(error, getattr(dist, "DistError", ())) or (isinstance(error, RuntimeError) and "gloo" in str(error))


def _chain(error: BaseException | None):
    """The error and its causes (a CheckpointError wraps the collective failure of a save)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__
