"""The heartbeat watchdog and the node topology, in one process with a fake store (the real thing, two launchers
with a killed or hung node, is tests/test_multinode.py)."""

from __future__ import annotations

import threading
import time

import pytest

from t2i_ds.trainer.topology import Topology, span
from t2i_ds.trainer.watchdog import EXIT_NODE_LOST, Watchdog, interval_for

TWO_NODES = Topology(((0, 1), (2, 3)), ("gpu-a", "gpu-b"), "gpu-a")


class FakeStore:
    """The three store calls the watchdog makes; `down` makes every call fail (the store's node is gone)."""

    def __init__(self):
        self.values: dict[str, int] = {}
        self.lock = threading.Lock()
        self.down = False

    def add(self, key: str, n: int) -> int:
        if self.down:
            raise RuntimeError("connection reset by peer")
        with self.lock:
            self.values[key] = self.values.get(key, 0) + n
            return self.values[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.values for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        if self.down:
            raise RuntimeError("connection reset by peer")
        return [str(self.values[k]).encode() for k in keys]


class Beater:
    """Other ranks' heartbeats, from a thread, until stopped."""

    def __init__(self, store: FakeStore, ranks: list[int], every: float = 0.05):
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(store, ranks, every), daemon=True)
        self.thread.start()

    def _run(self, store, ranks, every):
        while not self._stop.wait(every):
            for r in ranks:
                store.add(f"t2i_ds/heartbeat/{r}", 1)

    def stop(self):
        self._stop.set()
        self.thread.join()


def watchdog(rank: int, store: FakeStore, exits: list, printed: list, timeout: float = 0.3, cleaned=None):
    return Watchdog(rank, TWO_NODES, timeout, lambda: "the last complete checkpoint is C",
                    lambda: cleaned.append(rank) if cleaned is not None else None, store=store, exit=exits.append)


def test_topology_names_nodes_and_ranks():
    t = Topology.from_keys(["h1|0|10", "h1|0|10", "h2|1|20", "h2|1|20"], "h1")
    assert t.nodes == ((0, 1), (2, 3)) and t.hosts == ("h1", "h2")
    assert t.plan() == {"nodes": 2, "ranks_per_node": [2, 2], "hosts": ["h1", "h2"], "master_addr": "h1"}
    assert t.describe([2, 3]) == "node 1 (host h2, ranks 2-3)"
    assert t.describe([3]) == "rank 3 of node 1 (host h2)"
    assert t.describe([1, 2, 3]) == "rank 1 of node 0 (host h1) and node 1 (host h2, ranks 2-3)"
    # two launchers on one machine (loopback) are two nodes: the launcher's pid tells them apart
    assert Topology.from_keys(["h|0|10", "h|1|11"], "127.0.0.1").nodes == ((0,), (1,))
    assert span([1, 4]) == "1, 4" and span([5]) == "5"


def test_interval_is_a_sixth_of_the_timeout_within_bounds():
    assert interval_for(300) == 5.0 and interval_for(6) == 1.0 and interval_for(0.5) == 0.2


def test_a_silent_node_is_named_by_the_lowest_survivor(capsys):
    store, exits, cleaned = FakeStore(), [], []
    beater = Beater(store, [1])  # rank 1 (same node) beats; node 1 (ranks 2, 3) never does
    try:
        start = time.monotonic()
        w = watchdog(0, store, exits, [], cleaned=cleaned)
        w.thread.join(timeout=5)
        took = time.monotonic() - start
    finally:
        beater.stop()
    assert exits == [EXIT_NODE_LOST] and cleaned == [0]
    assert 0.3 <= took < 2 * 0.3 + 0.2  # the timeout, plus at most two beats (0.2 s: the shortest beat)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"t2i_ds.train: error: {w.verdict}"]
    assert w.verdict.startswith("lost node 1 (host gpu-b, ranks 2-3): no heartbeat for ")
    assert w.verdict.endswith("(train.collective_timeout_s=0.3); the last complete checkpoint is C")


def test_a_survivor_that_is_not_the_lowest_prints_nothing(capsys):
    store, exits, cleaned = FakeStore(), [], []
    beater = Beater(store, [0])  # rank 1 watches: rank 0 is alive and reports, node 1 is gone
    try:
        w = watchdog(1, store, exits, [], cleaned=cleaned)
        w.thread.join(timeout=5)
    finally:
        beater.stop()
    assert exits == [EXIT_NODE_LOST] and cleaned == [] and w.verdict.startswith("lost node 1 ")
    assert capsys.readouterr().err == ""


def test_a_failed_collective_shortens_the_wait_to_three_beats():
    store, exits = FakeStore(), []
    beater = Beater(store, [1])
    try:
        w = watchdog(0, store, exits, [], timeout=1.8)  # beats every 0.3 s
        start = time.monotonic()
        w.failed(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer"))  # returns on the verdict
        took = time.monotonic() - start
    finally:
        beater.stop()
    assert exits == [EXIT_NODE_LOST] and "after a collective with it failed" in w.verdict
    assert took < 1.5  # 3 beats (0.9 s) and a little, not the 1.8 s timeout


def test_a_user_error_or_a_healthy_world_is_no_lost_node():
    store, exits = FakeStore(), []
    beater = Beater(store, [1, 2, 3])
    try:
        w = watchdog(0, store, exits, [], timeout=0.3)
        start = time.monotonic()
        err = RuntimeError("checkpoint not saved")
        err.user_error = True
        w.failed(err)  # a known, agreed error: no wait
        assert time.monotonic() - start < 0.1
        w.failed(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))  # a bug of this rank: no wait either
        assert time.monotonic() - start < 0.1
        w.failed(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 300ms for recv"))
        assert time.monotonic() - start < 0.3 + 0.2 * 2 + 0.3  # everyone beats: returns (the caller re-raises)
        time.sleep(0.6)  # well past the timeout: nobody is declared lost while they beat
    finally:
        w.close()
        beater.stop()
    assert exits == [] and w.verdict is None and not w.thread.is_alive()


def test_the_store_gone_names_node_0(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "gpu-a")
    monkeypatch.setenv("MASTER_PORT", "29500")
    store, exits = FakeStore(), []
    beater = Beater(store, [0, 1, 3])
    w = watchdog(2, store, exits, [])
    time.sleep(0.3)
    beater.stop()
    store.down = True
    w.thread.join(timeout=5)
    assert exits == [EXIT_NODE_LOST]
    assert w.verdict.startswith("lost node 0 (host gpu-a, ranks 0-1): the rendezvous store at gpu-a:29500 it hosts "
                                "stopped answering for ")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_collective_timeout_must_be_positive(value):
    from t2i_ds.config import ConfigError, apply_overrides, preset

    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        apply_overrides(preset("debug"), [f"train.collective_timeout_s={value}"])


def test_the_checkpoint_being_written_is_removed_and_a_complete_one_kept(tmp_path):
    """What the lowest survivor does before its line (Trainer._remove_partial_checkpoint, the watchdog's cleanup)."""
    from t2i_ds.trainer import checkpointing
    from t2i_ds.trainer.trainer import Trainer

    t = Trainer.__new__(Trainer)  # only the two attributes the cleanup reads
    t.ckpt_root = tmp_path / "checkpoints"
    done, partial = t.ckpt_root / "step_00000002", t.ckpt_root / "step_00000004"
    for d in (done, partial):
        d.mkdir(parents=True)
        (d / "rank_00000.pt").write_bytes(b"x")
    (done / checkpointing.MARKER).write_text("{}")
    t.saving = partial
    t._remove_partial_checkpoint()
    assert not partial.exists() and done.is_dir()
    t.saving = done  # a save that completed (marker written) before the node was lost is kept
    t._remove_partial_checkpoint()
    assert done.is_dir()
