"""The training loop: DeepSpeed engine, global-count loss normalisation, TensorBoard, checkpoints.

One optimizer step = `grad_accum` micro-batches per rank. The loss is the mean over all non-pad
targets of the *global* batch: each micro-batch contributes `loss_sum * world * accum / N_global`,
where N_global (the step's target count over all ranks and micro-batches) is all-reduced once per
step as a device tensor. DeepSpeed divides by `accum` in backward and averages gradients over the
`world` data-parallel ranks, which cancels the two factors exactly.

A run never lies and never loses work:
  * Before DeepSpeed starts (every rank, nothing written yet but a stale JIT build lock's removal): no live training in
    the run directory, the checkpoint to resume verified against its manifest (falling back to the previous
    one), the config compared with the run's (t2i_ds.trainer.rundir), and some work left: a checkpoint at or
    past the last step ends the start with one line and exit status 0, the run directory untouched.
  * Rank 0 holds the run directory's lock; holding it, it moves the damaged checkpoints a fallback skipped
    aside (one warning line; checkpointing.move_aside); failures at agreement points (data fetch, checkpoint save/load,
    the lock) end every rank together with the failing rank's one line (t2i_ds.trainer.agree).
  * Non-finite steps: ZeRO's optimizer (DeepSpeed 0.19) checks the global gradient norm it computes anyway,
    in fp32 and bf16 alike, and on a non-finite one skips the update and the LR scheduler; the loop reads
    `engine.skipped_steps` (a host integer: no extra sync), counts, logs, postpones a scheduled checkpoint
    to the next good step, and after `train.max_consecutive_skips` in a row stops without saving, naming the
    last good checkpoint. The step counter and the data advance over a skipped step, as DeepSpeed's own
    `global_steps` does; the LR schedule does not.
  * A lost or hung node: `train.collective_timeout_s` bounds the process group's start and every collective, and
    the heartbeat watchdog (t2i_ds.trainer.watchdog) ends the survivors with one line naming the node and the last
    complete checkpoint, after removing the checkpoint being written; a collective that failed on the main thread
    waits for that verdict instead of printing the backend's traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from t2i_ds.atomic import atomic_write_text
from t2i_ds.config import Config, ConfigError
from t2i_ds.provenance import git_revision
from t2i_ds.trainer import checkpointing, jit_cache, rundir, topology
from t2i_ds.trainer.agree import Agreement
from t2i_ds.trainer.batching import BatchPlan, resolve_batch, resolve_ds_config
from t2i_ds.trainer.comms import CommsWindow, logger_enabled
from t2i_ds.trainer.flops import flops_per_token, modality_positions, peak_flops
from t2i_ds.trainer.metrics import MetricWindow, TensorBoard, loss_metrics, memory_metrics, modality_metrics
from t2i_ds.trainer.parallelize import (build_initialised_model, resident_parameter_elements, restore_torch_linear,
                                       wrap_with_deepspeed)
from t2i_ds.trainer.watchdog import Watchdog
from t2i_ds.vocab import IGNORE


class ProcessGroupError(RuntimeError):
    """The process group did not form (a node missing, a wrong --node_rank or --num_nodes, the master unreachable)."""

    user_error = True


def init_distributed(timeout_s: float) -> tuple[int, int, torch.device]:
    """Start (or join) the process group; works under the DeepSpeed launcher, torchrun or as a single process.
    `timeout_s` (train.collective_timeout_s) bounds the wait for every rank to join and every later collective."""
    import deepspeed

    jit_cache.use_own_cache()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    cuda = torch.cuda.is_available()
    try:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # noqa: BLE001  (store timeout, address in use, connection refused: one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProcessGroupError(
            f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} could not join the process group at "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within train.collective_timeout_s={timeout_s:g}: "
            f"{first} (every node needs the same hostfile/--num_nodes and master address and port, and its own "
            "--node_rank)") from e
    if not cuda:
        release_shm_workspace()
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


SHM_DIR = "/dev/shm"


def shm_workspace_name(rank: int) -> str:
    """The POSIX shared-memory name of a rank's all-reduce workspace in DeepSpeed's CPU communication op
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`)."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_workspace() -> None:
    """Unlink this rank's shared-memory workspace as soon as every rank has mapped every other's.

    With all ranks on one host, DeepSpeed's CPU op creates a ~69 MB segment per rank in /dev/shm and never
    unlinks it: each 2-rank run left 138 MB of RAM behind, and a day of runs filled the 24 GB machine until it
    thrashed (a `make test` that never finished). The mappings stay valid after the unlink; the memory goes back
    when the last rank exits, however it exits. The barrier matters: a rank still opening a peer's segment would
    spin forever on the missing name (shm.cpp retries on ENOENT)."""
    if dist.get_world_size() == 1:
        return
    dist.barrier()  # every rank has returned from DeepSpeed's init, so every segment is mapped by every rank
    try:
        os.unlink(os.path.join(SHM_DIR, shm_workspace_name(dist.get_rank())))
    except FileNotFoundError:  # ranks on several hosts (no shared-memory path), or no /dev/shm
        pass


def leave_distributed() -> None:
    """Undo `init_distributed`: destroy the process group through DeepSpeed (which also drops its cached groups),
    so that a later `init_distributed` in this process starts afresh. A group left to the interpreter's exit is
    torn down while its communication threads still run, and the process can die after its last line with
    "terminate called without an active exception" (a finished run turned into a failed one)."""
    import deepspeed.comm

    if dist.is_available() and dist.is_initialized():
        deepspeed.comm.destroy_process_group()


def total_steps(cfg: Config, plan: BatchPlan) -> int:
    """train.steps, or (when null) train.total_tokens // tokens per step."""
    return cfg.train.steps if cfg.train.steps is not None else max(1, cfg.train.total_tokens // plan.tokens_per_step)


class NonFiniteStop(RuntimeError):
    """Too many skipped (non-finite) steps in a row."""

    user_error = True
    agreed = True  # DeepSpeed all-reduces the overflow flag: every rank stops at the same step


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the next agreed step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.raised = True


class Trainer:
    def __init__(self, cfg: Config, user_ds_config: dict):
        self.lock: rundir.RunLock | None = None
        self.tb: TensorBoard | None = None
        self.watchdog: Watchdog | None = None
        self.saving: Path | None = None  # the checkpoint directory being written
        try:
            self._setup(cfg, user_ds_config)
        except BaseException as e:
            self._failed(e)
            self.close()  # a failed start leaves the run directory free and the process as it found it
            raise

    def _failed(self, error: BaseException) -> None:
        """A collective that failed because a node is gone ends here, with the watchdog's one line."""
        if self.watchdog is not None:
            self.watchdog.failed(error)
            self.watchdog.close()

    def _setup(self, cfg: Config, user_ds_config: dict) -> None:
        self.cfg = cfg
        t = cfg.train
        self.run_dir = Path(t.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # every rank, before DeepSpeed starts (the same answer on every rank; nothing is written)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.vocab = cfg.vocab.build()
        self.plan = resolve_batch(t.tokens_per_step, self.vocab.seq_len, t.micro_batch, world, t.batch_tolerance)
        self.ds_config = resolve_ds_config(user_ds_config, self.plan, cfg.optim.grad_clip, torch.cuda.is_available())
        self.steps = total_steps(cfg, self.plan)
        self.resume_from, self.config_changes = self._preflight()
        self.rank, self.world, self.device = init_distributed(t.collective_timeout_s)
        self.agree = Agreement(self.rank, self.world)
        self.lock, self.run_id = self._take_run_dir()
        self.topology = topology.gather(self.world)
        if self.world > 1:  # a lost or hung node ends the run within seconds, naming it
            self.watchdog = Watchdog(self.rank, self.topology, t.collective_timeout_s, self._last_checkpoint,
                                     self._remove_partial_checkpoint)
        self.data = self._agreed(self._make_data)  # before the model: a bad data path fails fast
        model = self._agreed(lambda: build_initialised_model(cfg, self.vocab, self.ds_config))  # ZeRO-3: partitioned
        self.param_elements_per_rank = self._gather_ints(resident_parameter_elements(model))
        self.freeze_report = model.freeze_report
        self.resume_plan = checkpointing.plan_for(self.resume_from, self.world, self.rank, self.agree)  # may convert
        engine_config = checkpointing.engine_config(self.ds_config, self.resume_plan)  # load_universal if converted
        self.engine = wrap_with_deepspeed(model, cfg, engine_config, self.steps)
        self.window = MetricWindow(self.device)
        self.comms = CommsWindow() if logger_enabled(self.ds_config) else None
        self.step = 0
        self._logged_step = 0  # step of the last metrics log
        self.tokens_seen = 0
        self.skipped, self.skip_streak, self.save_pending = 0, 0, False
        self.last_saved: int | None = None  # step of this invocation's newest checkpoint (or the resumed one)
        self.flops_per_token = flops_per_token(model.args, self.vocab.seq_len)
        self.peak = peak_flops(self.device)
        self.probes = self._agreed(self._make_probes)
        self.sampler = self._agreed(self._make_sampler)
        self.stop = StopFlag()
        self._resume()
        self.tb = TensorBoard(str(self.run_dir / "tb"), enabled=self.rank == 0, purge_step=self.step + 1 if self.step else 0)
        self._write_run_files()

    # ---- set-up --------------------------------------------------------------------------------
    def _log0(self, msg: str) -> None:
        """Before the process group exists: print on rank 0 (the launcher's RANK) only."""
        if os.environ.get("RANK", "0") == "0":
            print(f"[t2i_ds] {msg}", flush=True)

    def _preflight(self) -> tuple[Path | None, list[str]]:
        """Checks every rank makes before DeepSpeed starts (deterministic, so the ranks agree); nothing is written.
        Returns the verified checkpoint to resume (or None) and the allowed config changes since it."""
        t = self.cfg.train
        jit_cache.use_own_cache()
        jit_cache.check_build_locks(warn=lambda m: self._log0(m.removeprefix("[t2i_ds] ")))
        rundir.check_not_busy(self.run_dir)
        if t.data_source == "shards":  # no shards, or image tars given as token data: one line naming the path
            from t2i_ds.data.shards import check_token_shard, list_shards

            check_token_shard(list_shards(self.cfg.data.path)[0])
        if t.resume == "never":
            done = checkpointing.complete_checkpoints(self.ckpt_root)
            if done:
                raise ConfigError(f"train.resume=never, but {self.run_dir} holds complete checkpoints of an earlier run "
                                  f"(newest {done[-1].name}): resume it with train.resume=auto, or choose another "
                                  "train.run_dir (or delete its checkpoints/)")
        path, self.damaged = checkpointing.choose_resume(t.resume, self.ckpt_root)
        changes = rundir.check_resume_config(path.parent.parent, self.cfg.to_dict()) if path else []
        if path is not None:
            self._check_work_left(path)
        return path, changes

    def _check_work_left(self, path: Path) -> None:
        """Raise NothingToDo (one line, exit 0, nothing written) when checkpoint `path` is at or past the last step."""
        done = checkpointing.read_marker(path).get("step")
        if done is None or int(done) < self.steps:
            return
        if self.damaged:  # left in place: moving them aside is a write, and this start writes nothing
            self._log0(f"{self._damaged_text()} (left in place: this start trains and writes nothing)")
        t = self.cfg.train
        steps = (f"train.steps={t.steps}" if t.steps is not None
                 else f"train.steps=null ({self.steps} steps from train.total_tokens={t.total_tokens:,})")
        raise rundir.NothingToDo(f"nothing to train: the checkpoint to resume, {path}, is at step {done} and {steps}; "
                                 f"trained nothing and left {self.run_dir} as it was (set train.steps above {done} to "
                                 "train further, or choose another train.run_dir)")

    def _damaged_text(self, moved: list[Path] | None = None) -> str:
        """"warning: step_X is damaged (why)[, moved aside to ...]" for the checkpoints the fallback skipped."""
        moved = moved or [None] * len(self.damaged)
        return "warning: " + "; ".join(
            f"{p.name} is damaged ({why})" + (f", moved aside to {to} (kept for inspection; never resumed, listed or "
                                              "counted by keep_last)" if to else "")
            for (p, why), to in zip(self.damaged, moved))

    def _move_damaged(self) -> None:
        """Rank 0, holding the lock: the damaged checkpoints newer than the resumed one go aside, said in one line."""
        if not self.damaged:
            return
        moved = self._agreed(lambda: [checkpointing.move_aside(p, why) for p, why in self.damaged] if self.rank == 0 else [])
        self.log(f"{self._damaged_text(moved)}: resuming from the previous complete checkpoint {self.resume_from.name}")

    def _last_checkpoint(self) -> str:
        kept = checkpointing.complete_checkpoints(self.ckpt_root, self.run_id)
        if not kept:
            return "this run has no complete checkpoint yet"
        return f"the last complete checkpoint is {kept[-1]} (resume with train.resume=auto)"

    def _remove_partial_checkpoint(self) -> None:
        """The directory of a save cut off by a lost node (never a complete checkpoint)."""
        if self.saving is not None and not checkpointing.is_complete(self.saving):
            shutil.rmtree(self.saving, ignore_errors=True)

    def _agreed(self, fn):
        """fn() on every rank; a failure on any rank ends every rank with its message."""
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001
            error = e
        self.agree(error)
        return result

    def _take_run_dir(self) -> tuple[rundir.RunLock | None, str]:
        """Rank 0 takes the run directory's lock; every rank learns the run id (and checks the resume choice agrees)."""
        self.agree(None)  # every rank is past its preflight (under NCCL, joining the group is no barrier): the lock
        # taken now would look like another training to a rank still checking the directory
        lock = self._agreed(lambda: rundir.RunLock(self.run_dir) if self.rank == 0 else None)
        if lock is not None and lock.stale:
            self.log(lock.stale)
        mine = [rundir.run_id(self.run_dir), str(self.resume_from)]
        if self.world > 1:
            everyone: list = [None] * self.world
            dist.all_gather_object(everyone, mine)
            choices = {e[1] for e in everyone}
            self.agree(None if len(choices) == 1 else ConfigError(
                f"ranks chose different checkpoints to resume ({sorted(choices)}): is {self.run_dir} on a "
                "filesystem every rank sees the same way?"))
            mine = everyone[0]
        self._move_damaged()  # every rank has chosen (the choices agree): now the damaged ones may go
        return lock, mine[0]

    def _make_data(self):
        t = self.cfg.train
        if t.data_source == "synthetic":
            from t2i_ds.trainer.synthetic import SyntheticBatches

            return SyntheticBatches(self.vocab, self.plan.micro_batch, self.plan.grad_accum, self.rank, self.world, t.seed)
        from t2i_ds.data.loader import TokenLoader

        return TokenLoader(self.cfg.data, self.vocab, self.plan.micro_batch, self.rank, self.world,
                           text_tokenizer=self.cfg.train.text_tokenizer, grad_accum=self.plan.grad_accum)

    def _gather_ints(self, value: int) -> list[int]:
        """One int from every rank (set-up only, never in the step)."""
        if self.world == 1:
            return [value]
        out = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([value], dtype=torch.int64, device=self.device))
        return [int(t.item()) for t in out]

    def _make_probes(self):
        """Forgetting probes (paper Table 1) when train.probe_every > 0."""
        t = self.cfg.train
        if not t.probe_every:
            return None
        from t2i_ds.data.tokenizers import TextTokenizer
        from t2i_ds.trainer.probes import TextProbes

        heldout = Path(t.probe_heldout).read_text(encoding="utf-8") if t.probe_heldout else None
        return TextProbes(TextTokenizer(t.text_tokenizer or None), self.vocab, heldout_text=heldout)

    def _make_sampler(self):
        """Image samples for TensorBoard when train.sample_every > 0: caption ids and the decoder."""
        t = self.cfg.train
        if not t.sample_every:
            return None
        from t2i_ds.data.image_tokenizers import load_image_tokenizer
        from t2i_ds.data.tokenizers import TextTokenizer

        ids = TextTokenizer(t.text_tokenizer or None).encode_batch(list(t.sample_captions))
        return ids, load_image_tokenizer(t.image_tokenizer)

    def _samples(self) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] for the configured captions (every rank samples: ZeRO-3 gathers)."""
        from t2i_ds.sampling import generate_images

        ids, image_tok = self.sampler
        model = self.engine.module
        was_training = model.training
        model.eval()
        codes = generate_images(model, self.vocab, ids, cfg_scale=self.cfg.train.sample_cfg_scale, seed=self.step)
        model.train(was_training)
        images = image_tok.decode(codes.to(self.device))  # (N, 3, H, W) in [-1, 1]
        return ((images.float() + 1) / 2).clamp(0, 1).cpu()

    def _write_run_files(self) -> None:
        """After the resume succeeded (or for a new run): the resolved config, plan and provenance of this run."""
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        rundir.write_run_id(self.run_dir, self.run_id)
        atomic_write_text(self.run_dir / "config.json", json.dumps(self.cfg.to_dict(), indent=2, default=str))
        atomic_write_text(self.run_dir / "ds_config.json", json.dumps(self.ds_config, indent=2))
        atomic_write_text(self.run_dir / "git_revision.txt", git_revision() + "\n")
        atomic_write_text(self.run_dir / "command.txt", " ".join(sys.argv) + "\n")
        p = self.plan
        summary = {
            "world_size": self.world, "micro_batch": p.micro_batch, "grad_accum": p.grad_accum,
            "global_batch": p.global_batch, "tokens_per_step": p.tokens_per_step, "steps": self.steps,
            "trainable_params": self.freeze_report.trainable, "total_params": self.freeze_report.total,
            "param_elements_per_rank": self.param_elements_per_rank,  # held after construction (ZeRO-3: partitions)
            **self.topology.plan(),  # nodes, ranks per node, hosts, master address
        }
        atomic_write_text(self.run_dir / "plan.json", json.dumps(summary, indent=2))
        self.tb.text("config", "```\n" + json.dumps(self.cfg.to_dict(), indent=2, default=str) + "\n```", 0)
        self.tb.scalars({"params/trainable": self.freeze_report.trainable, "params/total": self.freeze_report.total}, 0)
        derived = f" (derived from train.total_tokens={self.cfg.train.total_tokens:,})" if self.cfg.train.steps is None else ""
        self.log(f"{self.freeze_report}; {p.global_batch} sequences = {p.tokens_per_step:,} tokens per step "
                 f"({p.micro_batch} x {p.grad_accum} accum x {self.world} ranks), {self.steps} steps{derived}")

    def _resume(self) -> None:
        """Load the checkpoint chosen (and verified) by the preflight; every rank or none."""
        plan = self.resume_plan
        if plan is None:
            if self.rank == 0:
                rundir.trim_step_logs(self.run_dir, 0)  # rows of an attempt that never reached a checkpoint
            return
        if plan.universal:
            self.log(f"resume: {plan.path.name} was saved by {plan.saved_world} data-parallel ranks, this run has "
                     f"{self.world}; converted with DeepSpeed's universal checkpoint into {plan.path.name}/{plan.tag} "
                     "(optimizer state included), loading that")
        client, rank_state = self._agreed(lambda: checkpointing.load(self.engine, plan, self.rank))
        self.step, self.tokens_seen = int(client["step"]), int(client["tokens_seen"])
        self.skipped = int(client.get("skipped_steps", 0))
        self.last_saved = self.step
        if rank_state is not None:
            self.data.load_state_dict(rank_state["data"])
            if "rng" in rank_state:
                checkpointing.set_rng_state(rank_state["rng"])
        self._logged_step = self.step
        dropped = rundir.trim_step_logs(self.run_dir, self.step) if self.rank == 0 else 0
        self.log(f"resumed from {plan.path} at step {self.step}" + (f"; dropped {dropped} metrics rows logged after it" if dropped else ""))
        if self.config_changes:
            self.log("config changed since the checkpoint: " + "; ".join(self.config_changes))

    def log(self, msg: str) -> None:
        """Global rank 0's log line; with several ranks it says so (each node's launcher prints its own ranks)."""
        if self.rank == 0:
            print(f"[t2i_ds rank 0] {msg}" if self.world > 1 else f"[t2i_ds] {msg}", flush=True)

    # ---- one optimizer step --------------------------------------------------------------------
    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Pinned host memory, then an async copy: a pageable copy would wait for the queued kernels."""
        if self.device.type != "cuda":
            return batch
        return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}

    def _global_count(self, micro: list[dict]) -> torch.Tensor:
        """Targets of this step over all ranks and micro-batches, computed and reduced on device (no sync)."""
        count = torch.stack([(b["targets"] != IGNORE).sum() for b in micro]).sum().float()
        if self.world > 1:
            dist.all_reduce(count)
        return count.clamp(min=1.0)

    def _next_micro_batches(self) -> list[dict[str, torch.Tensor]]:
        """This step's micro-batches; their sample ids go to run_dir/samples/ when train.record_samples. A data error
        on any rank (a damaged shard) ends every rank with its line."""
        micro, keys = self._agreed(self._fetch)
        if self.cfg.train.record_samples:
            self._record_samples(keys)
        return micro

    def _fetch(self) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
        micro, keys = [], []
        for _ in range(self.plan.grad_accum):
            micro.append(self._to_device(next(self.data)))
            keys += getattr(self.data, "last_keys", [])
        return micro, keys

    def _record_samples(self, keys: list[str]) -> None:
        """One JSON line per step and rank: the sample ids this rank trained on (host data, no sync)."""
        path = self.run_dir / "samples" / f"rank_{self.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step + 1, "ids": keys}) + "\n")

    def train_step(self) -> bool:
        """One optimizer step; True when DeepSpeed skipped the update (non-finite global gradient norm)."""
        micro = self._next_micro_batches()
        scale = (self.world * self.plan.grad_accum) / self._global_count(micro)  # device scalar
        skipped_before = self.engine.skipped_steps
        for batch in micro:
            ids, tgt = batch["input_ids"], batch["targets"]
            out = self.engine(ids, tgt)
            self.engine.backward(out.loss_sum * scale)
            self.engine.step()
            self.window.add(out.modality_sums, out.modality_counts, ids.numel())
            self.window.add_positions(modality_positions(tgt, self.vocab.modality_bounds))  # device ops, no sync
        self.step += 1
        self.tokens_seen += self.plan.tokens_per_step
        return self.engine.skipped_steps > skipped_before  # host ints: DeepSpeed synced its overflow flag already

    def _count_skip(self) -> None:
        """Count and log a skipped step; stop after `max_consecutive_skips` in a row, without saving."""
        self.skipped += 1
        self.skip_streak += 1
        self.tb.scalars({"train/skipped_steps": self.skipped}, self.step)
        limit = self.cfg.train.max_consecutive_skips
        self.log(f"step {self.step}: non-finite gradient norm, update skipped ({self.skip_streak} in a row of at most "
                 f"{limit}, {self.skipped} in this run)")
        if self.skip_streak >= limit:
            kept = checkpointing.complete_checkpoints(self.ckpt_root, self.run_id)
            last = f"the last good complete checkpoint is {kept[-1]}" if kept else "this run has no complete checkpoint yet"
            raise NonFiniteStop(
                f"{self.skip_streak} steps in a row (steps {self.step - self.skip_streak + 1}-{self.step}) had a non-finite "
                f"gradient norm: stopped without saving; {last} (lower optim.lr or check the data, then resume)")

    # ---- logging, checkpoints, loop ------------------------------------------------------------
    def _log_metrics(self) -> dict[str, float]:
        steps, self._logged_step = self.step - self._logged_step, self.step
        sums, counts, tokens, seconds = self.window.reduce()
        metrics = loss_metrics(sums, counts)
        tok_s = tokens / max(seconds, 1e-9)
        metrics.update({
            "train/skipped_steps": float(self.skipped),
            "lr": self.engine.get_lr()[0],
            "tokens/seen": float(self.tokens_seen),
            "perf/tokens_per_s": tok_s,
            "perf/tokens_per_s_per_device": tok_s / self.world,
            "perf/tflops_per_device": tok_s * self.flops_per_token / self.world / 1e12,
        })
        if self.peak:
            metrics["perf/mfu"] = metrics["perf/tflops_per_device"] * 1e12 / self.peak
        metrics.update(modality_metrics(self.window.reduced_positions, self.engine.module.args, seconds, self.world))
        if self.comms is not None:
            metrics.update(self.comms.metrics(steps))
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        metrics.update(memory_metrics(self.device))
        metrics.update(self._data_metrics())
        self.tb.scalars(metrics, self.step)
        if self.rank == 0:  # the same numbers as JSON lines, for scripts and tests
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        self.window.reset()
        return metrics

    def _data_metrics(self) -> dict[str, float]:
        """This rank's loader counters (samples, text samples, broken records by reason), rank 0 logs."""
        stats = getattr(self.data, "stats", None)
        return {f"data/{k.replace(':', '/')}": float(v) for k, v in stats.items()} if stats else {}

    def _print(self, m: dict[str, float]) -> None:
        parts = [f"step {self.step}/{self.steps}", f"loss {m.get('loss/total', float('nan')):.4f}"]
        parts += [f"{k[5:]} {m[k]:.4f}" for k in ("loss/text", "loss/image") if k in m]
        parts += [f"lr {m['lr']:.2e}", f"{m['perf/tokens_per_s']:.0f} tok/s"]
        if "perf/mfu" in m:
            parts.append(f"MFU {m['perf/mfu']:.1%}")
        self.log(" | ".join(parts))

    def save(self) -> None:
        client = {"step": self.step, "tokens_seen": self.tokens_seen, "skipped_steps": self.skipped}
        rank_state = {"data": self.data.state_dict()}
        self.saving = self.ckpt_root / checkpointing.tag_for(self.step)  # removed by the watchdog if a node is lost
        path = checkpointing.save(self.engine, self.ckpt_root, self.step, client, rank_state, self.cfg.train.keep_last,
                                  self.rank, self.world, self.run_id, self.agree)
        self.saving = None  # (kept after a failed save: the watchdog may still have to remove it)
        self.last_saved, self.save_pending = self.step, False
        self.log(f"checkpoint {path}")

    def _stop_requested(self) -> bool:
        """Cross-rank agreement on a received signal, every `signal_check_every` steps (one tiny all-reduce)."""
        if self.step % self.cfg.train.signal_check_every:
            return False
        flag = torch.tensor(float(self.stop.raised), device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def run_hooks(self) -> None:
        """Probes and samples (all ranks take part: under ZeRO-3 the forward gathers parameters)."""
        t = self.cfg.train
        if t.probe_every and self.step % t.probe_every == 0 and self.probes is not None:
            result = self.probes.run(self.engine.module)  # tags are already "probe/..."
            self.tb.scalars(result.metrics, self.step)
            for k, v in result.texts.items():
                self.tb.text(k, v, self.step)
            self.log("probe: " + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
        if t.sample_every and self.step % t.sample_every == 0 and self.sampler is not None:
            self.tb.images("samples", self._samples(), self.step)
            self.tb.text("samples/captions", "\n\n".join(t.sample_captions), self.step)

    def fit(self) -> dict[str, float]:
        try:
            return self._fit()
        except BaseException as e:
            self._failed(e)
            raise

    def _fit(self) -> dict[str, float]:
        self.engine.train()
        self.first_step = self.step
        last: dict[str, float] = {}
        t = self.cfg.train
        while self.step < self.steps:
            skipped = self.train_step()
            if skipped:
                self._count_skip()
            else:
                self.skip_streak = 0
            if self.step % t.log_every == 0 or self.step == self.steps:
                last = self._log_metrics()
                self._print(last)
            self.run_hooks()
            # a scheduled checkpoint waits for a good step: a run of skips must not rotate out older checkpoints
            self.save_pending |= bool(t.ckpt_every) and self.step % t.ckpt_every == 0 and self.step < self.steps
            if self.save_pending and not skipped:
                self.save()
            if self._stop_requested():
                self.log("stop requested: writing a checkpoint and exiting")
                self._final_save()
                break
            if t.stop_after_steps and self.step - self.first_step >= t.stop_after_steps and self.step < self.steps:
                self.log(f"stop_after_steps={t.stop_after_steps} reached: writing a checkpoint and exiting")
                self._final_save()
                break
        else:
            if t.save_final:
                self._final_save()
        self.tb.flush()
        return last

    def _final_save(self) -> None:
        """The invocation's last checkpoint, unless this invocation already saved (or resumed) this very step.
        Its weights are those of the last good step even after a few skipped ones (a skip never updates)."""
        if self.last_saved != self.step:
            self.save()

    def close(self) -> None:
        """Release what the trainer holds: the watchdog, event files, the run-directory lock, ZeRO-3's process-wide
        swap of torch.nn.functional.linear, the process group. Safe to call twice."""
        if self.watchdog is not None:
            self.watchdog.close()
        if self.tb is not None:
            self.tb.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        restore_torch_linear()
        leave_distributed()
