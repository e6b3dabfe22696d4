"""Two nodes on one machine: launcher processes meeting over loopback (127.0.0.1 and 127.0.0.2 both reach it),
one CPU rank per "node", the debug preset.

In `make test` (each launch costs 15-30 s on two cores):
  * the SLURM template's per-node body (scripts/slurm/node.sh, which runs DeepSpeed's launcher with a hostfile in
    --no_ssh mode) under a faked SLURM environment trains the same losses and sample ids per step as one launcher
    with the same two ranks (tests/trainer_utils.py DEBUG_RUNS["zero2_x2"], shared), writes one complete
    checkpoint with both ranks' shards, one metrics file and one TensorBoard file, and records the nodes in plan.json;
  * a node SIGKILLed or SIGSTOPped (hung) mid-run ends the survivor within 2 x train.collective_timeout_s with one
    line naming the node and the last complete checkpoint, exit status 3, no partial checkpoint;
  * a process group that cannot form (a rank whose master never comes) ends with one line, exit status 2.
  * torchrun --nnodes 2 with a static and with a c10d rendezvous trains the same losses and sample ids as one
    launcher.
The three failures run at once: their waits for the timeout overlap.
Opt-in (T2I_DS_MULTINODE_ALL=1, marker `multinode_all`, about 2 minutes more): `train.resume=auto` on the surviving
node alone, DeepSpeed's launcher given a wrong --node_rank, and the loss of node 0 (which hosts the rendezvous store).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer_utils import DEBUG_STEPS, DS_ZERO2, ROOT, env, free_port, losses, metrics, sample_ids, train

HOSTS = ("127.0.0.1", "127.0.0.2")
TIMEOUT = 6  # train.collective_timeout_s of the lost-node tests (the heartbeat beats every second)
DEBUG = ["--ds_config", DS_ZERO2, "--preset", "debug"]


# ---- launching ------------------------------------------------------------------------------------
def hostfile(tmp_path: Path, slots: int = 1) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("".join(f"{h} slots={slots}\n" for h in HOSTS))
    return path


def deepspeed_node(node: int, hosts: Path, port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hosts), "--no_ssh", "--node_rank",
            str(node), "--master_addr", HOSTS[0], "--master_port", str(port), "--module", "t2i_ds.train", *args]


def deepspeed_launch(node: int, port: int, args: list[str]) -> list[str]:
    """DeepSpeed's per-node launcher, as `deepspeed --hostfile H --no_ssh --node_rank I` runs it (one process and one
    DeepSpeed import fewer per node than going through the runner: seconds on two cores)."""
    world = base64.urlsafe_b64encode(json.dumps({h: [0] for h in HOSTS}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}", f"--node_rank={node}",
            f"--master_addr={HOSTS[0]}", f"--master_port={port}", "--module", "t2i_ds.train", *args]


class Node:
    """One launcher process (its own session, so a signal reaches the launcher and its ranks), output in files."""

    def __init__(self, cmd: list[str], logs: Path, extra_env: dict | None = None):
        self.out, self.err = logs.with_suffix(".out"), logs.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, stdout=out, stderr=err,
                                         start_new_session=True)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            raise AssertionError(f"still running after {timeout} s:\n{self.text()[-3000:]}") from None


def run_nodes(nodes: list[Node], timeout: float = 300) -> None:
    try:
        for n in nodes:
            assert n.wait(timeout) == 0, n.text()[-4000:]
    finally:
        for n in nodes:
            n.signal(signal.SIGKILL)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("t2i_ds.train: error:")]


# ---- what two nodes must give ----------------------------------------------------------------------
def assert_same_as_one_launcher(run: Path, ref: Path, ranks_per_node: list[int], master: str | None = HOSTS[0]) -> None:
    """`master` None: the launcher chose the master address (torchrun's c10d rendezvous: the first agent's host)."""
    from t2i_ds.trainer import checkpointing

    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == list(range(1, DEBUG_STEPS + 1))  # each step logged once (rank 0 only)
    for step in want:
        print(step, want[step], got[step], abs(got[step] - want[step]) / want[step])
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    assert sample_ids(run) == sample_ids(ref)  # the same rows of the global batch, every step
    assert len(list((run / "samples").glob("rank_*.jsonl"))) == sum(ranks_per_node)
    (ckpt,) = [p for p in (run / "checkpoints").iterdir() if p.is_dir()]  # exactly one, and complete
    assert ckpt.name == checkpointing.tag_for(DEBUG_STEPS) and checkpointing.verify(ckpt) is None
    assert checkpointing.read_marker(ckpt)["world_size"] == sum(ranks_per_node)
    assert len(list(ckpt.glob("zero_pp_rank_*_optim_states.pt"))) == sum(ranks_per_node)  # every node's shards
    assert len(list((run / "tb").iterdir())) == 1  # TensorBoard written by global rank 0 only
    plan = json.loads((run / "plan.json").read_text())
    assert (plan["nodes"], plan["ranks_per_node"]) == (len(ranks_per_node), ranks_per_node)
    assert plan["master_addr"] == master if master else plan["master_addr"]


# ---- the SLURM template -----------------------------------------------------------------------------
def fake_slurm(tmp_path: Path) -> Path:
    """A directory with an `scontrol` that expands a comma-separated node list (all `node.sh` asks of it)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] || exit 1\necho "$3" | tr , "\\n"\n')
    scontrol.chmod(0o755)
    return bin_dir


@pytest.mark.slow
def test_slurm_template_on_two_loopback_nodes_matches_one_launcher(tmp_path, debug_run):
    ref = debug_run("zero2_x2")  # one launcher, two ranks
    run, port = tmp_path / "run", free_port()
    # scontrol, then the usual PATH, then this environment's `deepspeed`: put first, the venv's ninja (another
    # version than the system's) would invalidate DeepSpeed's JIT-built op and rebuild it (2 minutes)
    path = f"{fake_slurm(tmp_path)}:{os.environ['PATH']}:{Path(sys.executable).parent}"
    args = [*DEBUG, "--set", f"train.steps={DEBUG_STEPS}", "--set", "train.record_samples=true",
            "--set", f"train.run_dir={run}"]
    nodes = [Node(["bash", str(ROOT / "scripts" / "slurm" / "node.sh"), *args], tmp_path / f"node{i}",
                  {"SLURM_NODEID": str(i), "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": ",".join(HOSTS),
                   "SLURM_JOB_ID": "4242", "GPUS_PER_NODE": "1", "MASTER_PORT": str(port), "PATH": path,
                   "HOSTFILE": str(tmp_path / f"hostfile{i}")})
             for i in range(2)]
    run_nodes(nodes)
    assert (tmp_path / "hostfile1").read_text() == "127.0.0.1 slots=1\n127.0.0.2 slots=1\n"
    assert_same_as_one_launcher(run, ref, [1, 1])
    assert f"[t2i_ds rank 0] step {DEBUG_STEPS}/{DEBUG_STEPS}" in nodes[0].text()  # logs name the global rank
    assert "[t2i_ds" not in nodes[1].text()  # node 1 holds no global rank 0: it logs no steps


# ---- a lost node --------------------------------------------------------------------------------------
class LostNodeRun:
    """Two DeepSpeed nodes training into `run`; `lose_after(3)` sends `sig` to all of node `lost`'s processes once
    step 3 is logged (a checkpoint every 2 steps), then the survivor is timed until its line and its end."""

    def __init__(self, tmp_path: Path, sig: int, steps: int = 1000, lost: int = 1):
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.sig, self.run, port = sig, tmp_path / "run", free_port()
        args = [*DEBUG, "--set", f"train.steps={steps}", "--set", "train.ckpt_every=2", "--set", "train.record_samples=true",
                "--set", f"train.collective_timeout_s={TIMEOUT}", "--set", f"train.run_dir={self.run}"]
        self.nodes = [Node(deepspeed_launch(i, port, args), tmp_path / f"node{i}") for i in range(2)]
        self.lost, self.survivor = lost, self.nodes[1 - lost]
        self.line_after = self.exit_after = None

    def lose_after(self, step: int) -> bool:
        """Signal node `lost` once `step` is logged (it must still be running); True once sent."""
        if getattr(self, "start", None) is not None:
            return True
        for n in self.nodes:
            assert n.proc.poll() is None, f"ended before step {step}:\n{n.text()[-4000:]}"
        if not ((self.run / "metrics.jsonl").is_file() and any(m["step"] >= step for m in metrics(self.run))):
            return False
        self.start = time.monotonic()
        self.nodes[self.lost].signal(self.sig)
        return True

    def poll(self) -> bool:
        """True once the survivor has ended (records when its error line appeared and when it ended)."""
        now = time.monotonic() - self.start
        if self.line_after is None and error_lines(self.survivor.err.read_text()):
            self.line_after = now
        if self.survivor.proc.poll() is not None:
            self.exit_after = now
            self.line_after = self.line_after if self.line_after is not None else now
            return True
        assert now < 2 * TIMEOUT + 30, f"survivor still running {now:.0f} s after the signal:\n{self.survivor.text()[-3000:]}"
        return False

    def kill(self) -> None:
        for n in self.nodes:
            n.signal(signal.SIGKILL)


def lose_nodes(tmp_path: Path, sigs: list[int], steps: int = 1000) -> list[LostNodeRun]:
    """Several two-node runs at once (their waits for the timeout overlap), each losing node 1 to its signal."""
    runs = [LostNodeRun(tmp_path / signal.Signals(s).name, s, steps) for s in sigs]
    try:
        deadline = time.monotonic() + 240
        while not all(r.lose_after(3) for r in runs):  # each as soon as it logged step 3
            assert time.monotonic() < deadline, "no step 3 within 240 s"
            time.sleep(0.05)
        pending = list(runs)
        while pending:
            pending = [r for r in pending if not r.poll()]
            time.sleep(0.05)
        return runs
    finally:
        for r in runs:
            r.kill()


@pytest.mark.slow
def test_a_killed_a_hung_and_a_missing_node_end_the_run_in_seconds_with_one_line(tmp_path):
    from t2i_ds.trainer import checkpointing

    alone, port = start_rank_without_master(tmp_path)  # a third failure, waiting for its timeout meanwhile
    for r in lose_nodes(tmp_path, [signal.SIGKILL, signal.SIGSTOP]):
        text = r.survivor.text()
        print(f"{signal.Signals(r.sig).name}: line after {r.line_after:.1f} s, survivor ended after {r.exit_after:.1f} s:\n"
              + "\n".join(text.splitlines()[-4:]))
        (line,) = error_lines(text)
        newest = checkpointing.complete_checkpoints(r.run / "checkpoints")[-1]
        assert "lost node 1 (host " in line and "rank 1)" in line and f"train.collective_timeout_s={TIMEOUT}" in line
        assert f"the last complete checkpoint is {newest} " in line
        assert "Traceback" not in text and "pair.cc" not in text
        assert r.survivor.proc.returncode == 3
        assert r.line_after < 2 * TIMEOUT and r.exit_after < 2 * TIMEOUT
        partial = [p.name for p in (r.run / "checkpoints").glob("step_*") if not checkpointing.is_complete(p)]
        assert not partial  # nothing half-written left visible
    assert_cannot_form_line(alone, port)


def start_rank_without_master(tmp_path: Path) -> tuple[Node, str]:
    """Rank 1 of 2 whose master never comes (a wrong master address or port, a node started alone), timeout 2 s."""
    port = str(free_port())
    cmd = [sys.executable, "-m", "t2i_ds.train", *DEBUG, "--set", "train.collective_timeout_s=2",
           "--set", f"train.run_dir={tmp_path / 'alone'}"]
    extra = {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": HOSTS[0], "MASTER_PORT": port}
    return Node(cmd, tmp_path / "alone", extra), port


def assert_cannot_form_line(node: Node, port: str) -> None:
    """One line (not torch's DistNetworkError traceback), exit status 2."""
    assert node.wait(120) == 2, node.text()[-3000:]
    (line,) = error_lines(node.text())
    assert "Traceback" not in node.text()
    assert f"rank 1 of 2 could not join the process group at {HOSTS[0]}:{port} within train.collective_timeout_s=2" in line


# ---- torchrun: the other launcher ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("rdzv", ["static", "c10d"])
def test_torchrun_two_nodes_match_one_launcher(tmp_path, debug_run, rdzv):
    ref = debug_run("zero2_x2")
    run, port = tmp_path / "run", free_port()
    args = [*DEBUG, "--set", f"train.steps={DEBUG_STEPS}", "--set", "train.record_samples=true",
            "--set", f"train.run_dir={run}"]
    rendezvous = (["--master_addr", HOSTS[0], "--master_port", str(port)] if rdzv == "static" else
                  ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{HOSTS[0]}:{port}", "--rdzv_id", "t2i"])
    nodes = []
    for i in range(2):
        node_rank = ["--node_rank", str(i)] if rdzv == "static" else []
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", *node_rank,
               *rendezvous, "-m", "t2i_ds.train", *args]
        nodes.append(Node(cmd, tmp_path / f"node{i}"))
    run_nodes(nodes)
    assert_same_as_one_launcher(run, ref, [1, 1], master=HOSTS[0] if rdzv == "static" else None)


@pytest.mark.slow
@pytest.mark.multinode_all
def test_resume_on_the_surviving_node_alone_continues_the_same_samples(tmp_path):
    """After node 1 was killed, node 0 alone (half the ranks) resumes through the universal checkpoint and trains
    each remaining step on the rows an uninterrupted run would have used."""
    steps = 12
    (lost,) = lose_nodes(tmp_path, [signal.SIGKILL], steps=steps)
    run = lost.run
    assert lost.survivor.proc.returncode == 3
    proc = train([*DEBUG, "--set", f"train.steps={steps}", "--set", "train.ckpt_every=2", "--set", "train.record_samples=true",
                  "--set", f"train.run_dir={run}"], ranks=1)
    assert "converted with DeepSpeed's universal checkpoint" in proc.stdout
    rows = 4  # the debug preset's global batch
    assert sample_ids(run) == {s: sorted(f"synthetic:{s - 1}:{r}" for r in range(rows)) for s in range(1, steps + 1)}
    assert sorted(losses(run)) == list(range(1, steps + 1))


@pytest.mark.slow
@pytest.mark.multinode_all
def test_a_wrong_node_rank_ends_with_one_line_within_the_timeout(tmp_path):
    """Both launchers told --node_rank 0: the second rank 0 cannot host the store, the first waits for rank 1."""
    run, port, hosts = tmp_path / "run", free_port(), hostfile(tmp_path)
    args = [*DEBUG, "--set", "train.collective_timeout_s=4", "--set", f"train.run_dir={run}"]
    nodes = [Node(deepspeed_node(0, hosts, port, args), tmp_path / f"node{i}") for i in range(2)]
    try:
        for n in nodes:
            assert n.wait(120) != 0
            lines = error_lines(n.text())
            assert len(lines) == 1 and "could not join the process group" in lines[0], n.text()[-3000:]
    finally:
        for n in nodes:
            n.signal(signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.multinode_all
def test_losing_the_master_node_names_it(tmp_path):
    """Node 0 hosts the rendezvous store (DeepSpeed's launcher: in rank 0's process): the survivor names node 0."""
    from t2i_ds.trainer import checkpointing

    run = LostNodeRun(tmp_path, signal.SIGKILL, lost=0)
    try:
        while not run.lose_after(3):
            time.sleep(0.05)
        while not run.poll():
            time.sleep(0.05)
    finally:
        run.kill()
    text = run.survivor.text()
    print(f"line after {run.line_after:.1f} s, ended after {run.exit_after:.1f} s:", *text.splitlines()[-3:], sep="\n")
    (line,) = error_lines(text)
    newest = checkpointing.complete_checkpoints(run.run / "checkpoints")[-1]
    assert line.startswith("t2i_ds.train: error: lost node 0 (host ") and f"is {newest} " in line
    assert run.survivor.proc.returncode == 3 and run.exit_after < 2 * TIMEOUT
