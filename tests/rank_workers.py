"""CPU ranks kept alive across the tests of a module: `Ranks.run(fn, **kw)` calls `fn(rank, **kw)` on every rank,
each in its own process (gloo over localhost, the real DeepSpeed engine), and returns the results in rank order.

Starting ranks (importing torch and DeepSpeed, joining the process group) is most of a small multi-rank test's
time; a module shares it. The ranks behave as under the launcher (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_* set),
and `t2i_ds.train.main(argv)` runs in them as it would there. A scenario that hangs fails after `timeout`
seconds and stops the ranks.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

from tests.trainer_utils import free_port


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", TRITON_INTERPRET="1",
                      OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    import faulthandler
    import signal
    import warnings

    import torch

    faulthandler.register(signal.SIGUSR1)  # a hang: the test dumps every rank's stack before stopping them
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    while (job := inbox.get()) is not None:
        fn, kwargs, port = job
        # A scenario whose trainer closed destroyed the process group; the next one joins a new group at a fresh
        # port (at the old one, a fast rank could meet the slow rank's old store, not yet torn down).
        os.environ["MASTER_PORT"] = str(port)
        try:
            outbox.put((rank, True, fn(rank, **kwargs)))
        except BaseException:  # noqa: BLE001  (reported to the test)
            outbox.put((rank, False, traceback.format_exc()))


class Ranks:
    def __init__(self, world: int = 2):
        ctx = mp.get_context("spawn")
        self.world, self.outbox = world, ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        port = free_port()  # until the first scenario sends its own
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def run(self, fn, timeout: float = 300, **kwargs) -> list:
        if not all(p.is_alive() for p in self.procs):
            raise RuntimeError("a rank process died in an earlier scenario")
        port = free_port()
        for q in self.inboxes:
            q.put((fn, kwargs, port))
        results, failures = {}, []
        for _ in range(self.world):
            try:
                rank, ok, value = self.outbox.get(timeout=timeout)
            except queue.Empty:
                for p in self.procs:
                    os.kill(p.pid, signal.SIGUSR1)
                time.sleep(2)
                self.close()
                raise AssertionError(f"{fn.__name__} did not finish on every rank within {timeout} s (a hang)") from None
            results[rank] = value
            if not ok:
                failures.append(f"rank {rank}:\n{value}")
        if failures:
            raise AssertionError("\n".join(failures))
        return [results[r] for r in range(self.world)]

    def close(self) -> None:
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()


def train_main(rank: int, argv: list[str]) -> dict:
    """`python -m t2i_ds.train ARGV` on this rank: exit code and what it printed."""
    from t2i_ds import train

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(argv)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
