"""Metrics accumulated on device and written to TensorBoard on rank 0 at log intervals only.

Per step the loop adds detached device tensors (loss sums and target counts per modality, and the
positions each modality's targets occupy); the window's host-device sync happens in `MetricWindow.reduce`,
every `log_every` steps, where its sums are all-reduced across ranks (one packed tensor) and turned into loss /
perplexity per modality (`loss_metrics`) and throughput / model FLOP/s per modality (`modality_metrics`: text,
image, special, pad).
"""

from __future__ import annotations

import math
import resource
import sys
import time

import torch
import torch.distributed as dist

from t2i_ds.trainer.flops import COMPUTE_CLASSES, modality_flops
from t2i_ds.vocab import MODALITY_NAMES

PPL_CAP = 80.0  # exp() of a loss above this overflows float formatting; report inf-like values capped


class MetricWindow:
    """Sums over the steps since the last `reset`, on the training device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        m = len(MODALITY_NAMES)
        self.sums = torch.zeros(m, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(m, dtype=torch.float64, device=self.device)
        self.positions = torch.zeros(len(COMPUTE_CLASSES), 2, dtype=torch.float64, device=self.device)
        self.reduced_positions: list[list[float]] = [[0.0, 0.0] for _ in COMPUTE_CLASSES]
        self.tokens = 0  # input tokens processed by this rank (host int, known from shapes)
        self.t0 = time.perf_counter()

    def add(self, sums: torch.Tensor, counts: torch.Tensor, tokens: int) -> None:
        self.sums += sums.detach().double()
        self.counts += counts.detach().double()
        self.tokens += tokens

    def add_positions(self, positions: torch.Tensor) -> None:
        """(4, 2) per compute class (text, image, special, pad): [positions, sum of (position + 1/2)]."""
        self.positions += positions.detach().double()

    def reduce(self) -> tuple[list[float], list[float], int, float]:
        """All-reduce the window (the sync point) -> (sums, counts, global tokens, seconds); the global
        per-class positions land in `reduced_positions`."""
        tokens = torch.tensor([float(self.tokens)], dtype=torch.float64, device=self.device)
        packed = torch.cat([self.sums, self.counts, self.positions.flatten(), tokens])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(packed)
        values = packed.tolist()  # host-device sync, once per log interval
        m, c = len(MODALITY_NAMES), len(COMPUTE_CLASSES)
        flat = values[2 * m : 2 * m + 2 * c]
        self.reduced_positions = [flat[2 * i : 2 * i + 2] for i in range(c)]
        return values[:m], values[m : 2 * m], int(values[-1]), time.perf_counter() - self.t0


def loss_metrics(sums: list[float], counts: list[float]) -> dict[str, float]:
    """loss/{total,text,image,special} and ppl/{...} from sums and counts (modalities without targets are left out)."""
    out = {}
    total_c = sum(counts)
    if total_c:
        out["loss/total"] = sum(sums) / total_c
    for name, s, c in zip(MODALITY_NAMES, sums, counts):
        if c:
            out[f"loss/{name}"] = s / c
    for key in [k for k in out if k.startswith("loss/")]:
        out["ppl/" + key[5:]] = math.exp(min(out[key], PPL_CAP))
    return out


def modality_metrics(positions: list[list[float]], args, seconds: float, world: int) -> dict[str, float]:
    """perf/tokens_per_s/<class>, perf/tflops_per_device/<class> and perf/pad_flops_share from the window's
    global per-class positions (class of a position = modality of its target; pad = no target)."""
    flops = modality_flops(positions, args)
    total = sum(flops.values())
    out = {}
    for (name, f), (n, _) in zip(flops.items(), positions):
        out[f"perf/tokens_per_s/{name}"] = n / max(seconds, 1e-9)
        out[f"perf/tflops_per_device/{name}"] = f / max(seconds, 1e-9) / world / 1e12
    out["perf/pad_flops_share"] = flops["pad"] / total if total else 0.0
    return out


def memory_metrics(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "mem/allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "mem/peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "mem/reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
        }
    return {"mem/host_max_rss_gib": host_peak_rss_gib()}


def host_peak_rss_gib() -> float:
    """This process's peak resident memory, GiB: /proc's VmHWM, the high-water mark of its own address space.

    Not `getrusage().ru_maxrss`: Linux carries that across exec, so a process started by a larger one (a launcher,
    a benchmark's parent holding a model) reported the parent's peak (4.00 GiB for a 2.6 GiB training child)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kib / 2**20
    except (OSError, StopIteration, ValueError):  # no /proc (macOS): ru_maxrss is bytes there, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)


class TensorBoard:
    """SummaryWriter on rank 0; a no-op elsewhere. `purge_step`: events of earlier invocations at or after it are
    hidden (a resume from step S purges S + 1 on, logged after that checkpoint by the interrupted invocation)."""

    def __init__(self, log_dir: str, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer:
            self.writer.add_text(tag, text, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.writer:
            self.writer.add_images(tag, images, step)

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
