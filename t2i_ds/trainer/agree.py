"""Cross-rank agreement on failure: the user's last line is the failing rank's error, not another rank's gloo
traceback.

A rank that hits an error at an agreement point (a data fetch, a checkpoint save or load, the run-directory
lock) does not leave at once: every rank calls `Agreement(error)` at the same point, a host-side all-reduce
of a flag (gloo: no device sync, a few microseconds on one node) and, only when a rank failed, an all-gather
of the messages. Every rank then raises `RankFailure` with the first failing rank's message, all ranks leave
together, and the train command prints it on rank 0 only.

Under NCCL the flag travels through a separate gloo group, so the check never waits for the device.
"""

from __future__ import annotations

import sys
import traceback

import torch
import torch.distributed as dist

from t2i_ds.cli import is_user_error


class RankFailure(RuntimeError):
    """Raised on every rank when `rank` failed with `message` at an agreement point."""

    agreed = True  # every rank raises it: rank 0 reports it
    user_error = True  # one line (a bug's traceback was printed by the failing rank)

    def __init__(self, rank: int, message: str, world: int):
        super().__init__(f"rank {rank}: {message}" if world > 1 else message)
        self.rank, self.message = rank, message


def describe(error: BaseException) -> str:
    """One line for a user-facing error; a bug keeps its type (its traceback is printed by the failing rank)."""
    return str(error) if is_user_error(error) else f"{type(error).__name__}: {error} (traceback above)"


class Agreement:
    """`agree(error_or_None)`: called by every rank at the same point; raises RankFailure everywhere if any failed."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.group = None
        if world > 1 and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # host flags: no device round trip

    def __call__(self, error: BaseException | None) -> None:
        if self.world == 1:
            if error is not None:
                raise error
            return
        if error is not None and not is_user_error(error):
            traceback.print_exception(error, file=sys.stderr)
        flag = torch.tensor([int(error is not None)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.item():  # a host tensor: no device sync
            return
        messages: list[str | None] = [None] * self.world
        dist.all_gather_object(messages, None if error is None else describe(error), group=self.group)
        first = next(r for r, m in enumerate(messages) if m is not None)
        raise RankFailure(first, messages[first], self.world) from error
