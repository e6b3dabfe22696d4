"""The training loop: DeepSpeed engine, global-count loss normalisation, TensorBoard, checkpoints.

One optimizer step = `grad_accum` micro-batches per rank. The loss is the mean over all non-pad
targets of the *global* batch: each micro-batch contributes `loss_sum * world * accum / N_global`,
where N_global (the step's target count over all ranks and micro-batches) is all-reduced once per
step as a device tensor. DeepSpeed divides by `accum` in backward and averages gradients over the
`world` data-parallel ranks, which cancels the two factors exactly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from t2i_ds.config import Config
from t2i_ds.provenance import git_revision
from t2i_ds.trainer import checkpointing
from t2i_ds.trainer.batching import BatchPlan, resolve_batch, resolve_ds_config
from t2i_ds.trainer.comms import CommsWindow, logger_enabled
from t2i_ds.trainer.flops import flops_per_token, modality_positions, peak_flops
from t2i_ds.trainer.metrics import MetricWindow, TensorBoard, loss_metrics, memory_metrics, modality_metrics
from t2i_ds.trainer.parallelize import build_initialised_model, resident_parameter_elements, wrap_with_deepspeed
from t2i_ds.vocab import IGNORE


def init_distributed() -> tuple[int, int, torch.device]:
    """Start (or join) the process group; works under the DeepSpeed launcher or as a single process."""
    import deepspeed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def total_steps(cfg: Config, plan: BatchPlan) -> int:
    return cfg.train.steps if cfg.train.steps > 0 else max(1, cfg.train.total_tokens // plan.tokens_per_step)


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
        self.cfg = cfg
        self.rank, self.world, self.device = init_distributed()
        self.vocab = cfg.vocab.build()
        t = cfg.train
        self.plan = resolve_batch(t.tokens_per_step, self.vocab.seq_len, t.micro_batch, self.world, t.batch_tolerance)
        self.ds_config = resolve_ds_config(user_ds_config, self.plan, cfg.optim.grad_clip, self.device.type == "cuda")
        self.steps = total_steps(cfg, self.plan)
        self.run_dir = Path(t.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.data = self._make_data()  # before the model: a bad data path fails fast
        model = build_initialised_model(cfg, self.vocab, self.ds_config)  # partitioned while built under ZeRO-3
        self.param_elements_per_rank = self._gather_ints(resident_parameter_elements(model))
        self.freeze_report = model.freeze_report
        self.resume_plan = checkpointing.plan_resume(t.resume, self.ckpt_root, self.world, self.rank)
        engine_config = checkpointing.engine_config(self.ds_config, self.resume_plan)  # load_universal if converted
        self.engine = wrap_with_deepspeed(model, cfg, engine_config, self.steps, self.device)
        self.tb = TensorBoard(str(self.run_dir / "tb"), enabled=self.rank == 0)
        self.window = MetricWindow(self.device)
        self.comms = CommsWindow() if logger_enabled(self.ds_config) else None
        self.step = 0
        self._logged_step = 0  # step of the last metrics log
        self.tokens_seen = 0
        self.flops_per_token = flops_per_token(model.args, self.vocab.seq_len)
        self.peak = peak_flops(self.device)
        self.probes = self._make_probes()
        self.sampler = self._make_sampler()
        self.stop = StopFlag()
        self._write_run_files()
        self._maybe_resume()

    # ---- set-up --------------------------------------------------------------------------------
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

        return TextProbes(TextTokenizer(t.text_tokenizer or None), self.vocab)

    def _make_sampler(self):
        """Image samples for TensorBoard when train.sample_every > 0: caption ids and the decoder."""
        t = self.cfg.train
        if not t.sample_every:
            return None
        from t2i_ds.data.images import load_image_tokenizer
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
        if self.rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2, default=str))
        (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))
        (self.run_dir / "git_revision.txt").write_text(git_revision() + "\n")
        (self.run_dir / "command.txt").write_text(" ".join(sys.argv) + "\n")
        p = self.plan
        summary = {
            "world_size": self.world, "micro_batch": p.micro_batch, "grad_accum": p.grad_accum,
            "global_batch": p.global_batch, "tokens_per_step": p.tokens_per_step, "steps": self.steps,
            "trainable_params": self.freeze_report.trainable, "total_params": self.freeze_report.total,
            "param_elements_per_rank": self.param_elements_per_rank,  # held after construction (ZeRO-3: partitions)
        }
        (self.run_dir / "plan.json").write_text(json.dumps(summary, indent=2))
        self.tb.text("config", "```\n" + json.dumps(self.cfg.to_dict(), indent=2, default=str) + "\n```", 0)
        self.tb.scalars({"params/trainable": self.freeze_report.trainable, "params/total": self.freeze_report.total}, 0)
        self.log(f"{self.freeze_report}; {p.global_batch} sequences = {p.tokens_per_step:,} tokens per step "
                 f"({p.micro_batch} x {p.grad_accum} accum x {self.world} ranks), {self.steps} steps")

    def _maybe_resume(self) -> None:
        plan = self.resume_plan
        if plan is None:
            return
        if plan.universal:
            self.log(f"resume: {plan.path.name} was saved by {plan.saved_world} data-parallel ranks, this run has "
                     f"{self.world}; converted with DeepSpeed's universal checkpoint into {plan.path.name}/{plan.tag} "
                     "(optimizer state included), loading that")
        client, rank_state = checkpointing.load(self.engine, plan, self.rank)
        self.step, self.tokens_seen = int(client["step"]), int(client["tokens_seen"])
        if rank_state is not None:
            self.data.load_state_dict(rank_state["data"])
            if "rng" in rank_state:
                checkpointing.set_rng_state(rank_state["rng"])
        self._logged_step = self.step
        self.log(f"resumed from {plan.path} at step {self.step}")

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[t2i_ds] {msg}", flush=True)

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
        """This step's micro-batches; their sample ids go to run_dir/samples/ when train.record_samples."""
        micro, keys = [], []
        for _ in range(self.plan.grad_accum):
            micro.append(self._to_device(next(self.data)))
            keys += getattr(self.data, "last_keys", [])
        if self.cfg.train.record_samples:
            self._record_samples(keys)
        return micro

    def _record_samples(self, keys: list[str]) -> None:
        """One JSON line per step and rank: the sample ids this rank trained on (host data, no sync)."""
        path = self.run_dir / "samples" / f"rank_{self.rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step + 1, "ids": keys}) + "\n")

    def train_step(self) -> None:
        micro = self._next_micro_batches()
        scale = (self.world * self.plan.grad_accum) / self._global_count(micro)  # device scalar
        for batch in micro:
            ids, tgt = batch["input_ids"], batch["targets"]
            out = self.engine(ids, tgt)
            self.engine.backward(out.loss_sum * scale)
            self.engine.step()
            self.window.add(out.modality_sums, out.modality_counts, ids.numel())
            self.window.add_positions(modality_positions(tgt, self.vocab.modality_bounds))  # device ops, no sync
        self.step += 1
        self.tokens_seen += self.plan.tokens_per_step

    # ---- logging, checkpoints, loop ------------------------------------------------------------
    def _log_metrics(self) -> dict[str, float]:
        steps, self._logged_step = self.step - self._logged_step, self.step
        sums, counts, tokens, seconds = self.window.reduce()
        metrics = loss_metrics(sums, counts)
        tok_s = tokens / max(seconds, 1e-9)
        metrics.update({
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
        client = {"step": self.step, "tokens_seen": self.tokens_seen}
        rank_state = {"data": self.data.state_dict()}
        path = checkpointing.save(self.engine, self.ckpt_root, self.step, client, rank_state, self.cfg.train.keep_last, self.rank)
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
        self.engine.train()
        self.first_step = self.step
        last: dict[str, float] = {}
        t = self.cfg.train
        while self.step < self.steps:
            self.train_step()
            if self.step % t.log_every == 0 or self.step == self.steps:
                last = self._log_metrics()
                self._print(last)
            self.run_hooks()
            if t.ckpt_every and self.step % t.ckpt_every == 0 and self.step < self.steps:
                self.save()
            if self._stop_requested():
                self.log("stop requested: writing a checkpoint and exiting")
                self.save()
                break
            if t.stop_after_steps and self.step - self.first_step >= t.stop_after_steps and self.step < self.steps:
                self.log(f"stop_after_steps={t.stop_after_steps} reached: writing a checkpoint and exiting")
                self.save()
                break
        else:
            done = checkpointing.complete_checkpoints(self.ckpt_root)
            if t.save_final and (not done or done[-1].name != checkpointing.tag_for(self.step)):
                self.save()
        self.tb.flush()
        return last

    def close(self) -> None:
        self.tb.close()
