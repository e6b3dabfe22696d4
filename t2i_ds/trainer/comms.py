"""Bytes moved by DeepSpeed's collectives, counted by its comms logger, and the per-step volume formulas.

Turn the logger on in the ds_config:

    "comms_logger": {"enabled": true, "prof_all": true}

DeepSpeed then records every collective that goes through `deepspeed.comm` (count and message size per op
name) in `deepspeed.comm.comms_logger.comms_dict`, on each rank. `log_summary()` prints it but needs live
peers, so the trainer reads the dict in-process at log intervals and reports bytes per optimizer step
(`comm/<op>/bytes_per_step`, `comm/bytes_per_step`). The trainer's own scalar all-reduces (the step's target
count, the metrics window) go through torch.distributed directly and are not counted (8 bytes per step).

Message size is DeepSpeed's: the input tensor's bytes for all_reduce / reduce / broadcast, the *local shard*
for all_gather_into_tensor and the *input* (the full, not yet scattered buffer) for reduce_scatter_tensor.

## Per-step volume, message bytes per rank and optimizer step

P = trainable parameter elements, F = frozen ones, A = micro-batches per step, W = data-parallel ranks,
g = bytes per gradient element on the wire (`communication_data_type`: fp32 = 4 in ds_configs/),
p = bytes per parameter element (bf16 = 2 on GPUs, fp32 = 4 on CPU ranks).

Stage 0 (`stage0_bytes`, ds_configs/zero0.json: data parallelism without partitions). The gradients accumulate
locally over the A micro-batches and are all-reduced once, at the step's last backward (DeepSpeed's buffered
all-reduce); every rank then steps the whole optimizer, so nothing is gathered. On one rank nothing is sent:

    gradient all-reduce  P x g          (0 when W = 1)

ZeRO-2 (`stage2_bytes`). Every micro-batch's backward reduces all trainable gradients (ZeRO-2 keeps only this
rank's partition of the accumulated gradient, so it cannot wait for the last micro-batch); after the
optimizer step each rank all-gathers the updated partitions:

    gradient reduction   A x P x g      all_reduce of the buckets (DeepSpeed 0.19's default
                                        `use_multi_rank_bucket_allreduce: true`, gloo and NCCL alike;
                                        with false it is one `reduce` per partition owner, same bytes)
    parameter all-gather P x p / W      each rank's partition (message = the local shard)

ZeRO-3 (`stage3_bytes`). Parameters stay partitioned. A parameter above `stage3_param_persistence_threshold`
elements is all-gathered for each micro-batch's forward, and again for its backward unless DeepSpeed kept it
(it does when the gathered parameters fit in `stage3_max_live_parameters` and `stage3_max_reuse_distance`,
as for small models); a parameter at or below the threshold stays whole after its first gather and is
all-gathered once per step after the optimizer step. Trainable gradients are reduce-scattered every
micro-batch (message = the whole bucket); frozen parameters are gathered but never reduced:

    all-gather       sum over large params of A x (1 + r) x ceil(n / W) x p  +  small params: ceil(n / W) x p
    reduce-scatter   A x sum over trainable params of ceil(n / W) x W x g
    r = 1 if parameters are released between forward and backward, else 0

Wire bytes per GPU follow from the ring algorithms: all-reduce 2 (W-1)/W x S, all-gather and reduce-scatter
(W-1)/W x S for a full buffer of S bytes (`ring_wire_bytes`). benchmarks/scale_model.py turns these into
seconds on N GPUs; tests/test_world_size.py checks both formulas against the counted bytes at 2 CPU ranks
within 5%; benchmarks/bench_comms.py records 2 and 4 ranks.
"""

from __future__ import annotations

from dataclasses import dataclass


def logger_enabled(ds_config: dict) -> bool:
    c = ds_config.get("comms_logger", {})
    return bool(c.get("enabled")) and bool(c.get("prof_all"))


def counted() -> dict[str, tuple[int, int]]:
    """{op name: (calls, message bytes)} recorded so far on this rank by DeepSpeed's comms logger."""
    from deepspeed.comm import comms_logger

    out = {}
    for op, by_size in comms_logger.comms_dict.items():
        calls = sum(v[0] for v in by_size.values())
        out[op] = (calls, sum(size * v[0] for size, v in by_size.items()))
    return out


class CommsWindow:
    """Bytes per step of each op since the last `metrics()` call (read in-process at log intervals only)."""

    def __init__(self):
        self._last = counted()

    def metrics(self, steps: int) -> dict[str, float]:
        now = counted()
        out: dict[str, float] = {}
        total = 0
        for op, (calls, size) in now.items():
            c0, s0 = self._last.get(op, (0, 0))
            if size - s0 or calls - c0:
                out[f"comm/{op}/bytes_per_step"] = (size - s0) / max(steps, 1)
                out[f"comm/{op}/calls_per_step"] = (calls - c0) / max(steps, 1)
                total += size - s0
        out["comm/bytes_per_step"] = total / max(steps, 1)
        self._last = now
        return out


@dataclass(frozen=True)
class Volume:
    """Message bytes per rank and optimizer step, by collective (DeepSpeed's message-size convention)."""

    all_reduce: float = 0.0  # ZeRO-2 gradient reduction
    all_gather: float = 0.0
    reduce_scatter: float = 0.0

    @property
    def total(self) -> float:
        return self.all_reduce + self.all_gather + self.reduce_scatter


def stage0_bytes(params: dict[str, tuple[int, bool]], world: int, grad_bytes: int) -> Volume:
    """Stage 0 from {name: (elements, trainable)}: one all-reduce of the trainable gradients per step (none on one
    rank: t2i_ds.trainer.parallelize turns it off there)."""
    return Volume(all_reduce=sum(n for n, t in params.values() if t) * grad_bytes if world > 1 else 0.0)


def stage2_bytes(params: dict[str, tuple[int, bool]], world: int, accum: int, grad_bytes: int,
                 param_bytes: int) -> Volume:
    """ZeRO-2 from {name: (elements, trainable)}: A gradient reductions, one all-gather of the partitions."""
    trainable = sum(n for n, t in params.values() if t)
    return Volume(all_reduce=accum * trainable * grad_bytes, all_gather=trainable * param_bytes / world)


def stage3_bytes(params: dict[str, tuple[int, bool]], world: int, accum: int, grad_bytes: int, param_bytes: int,
                 persistence_threshold: int, regather: float) -> Volume:
    """ZeRO-3 from {name: (elements, trainable)}; `regather` = share of large parameters gathered again for
    the backward (0: kept from the forward, 1: released and gathered again)."""
    gather = scatter = 0.0
    for n, trainable in params.values():
        part = -(-n // world)  # DeepSpeed pads each parameter's partition to ceil(n / W)
        passes = accum * (1 + regather) if n > persistence_threshold else 1
        gather += passes * part * param_bytes
        if trainable:
            scatter += accum * part * world * grad_bytes
    return Volume(all_gather=gather, reduce_scatter=scatter)


def stage3_regather(zero_config: dict, params: dict[str, tuple[int, bool]]) -> float:
    """0 when DeepSpeed keeps every gathered parameter from forward to backward (they fit in
    stage3_max_live_parameters and stage3_max_reuse_distance), else 1 (an upper bound: DeepSpeed keeps the
    last layers' parameters, whose reuse distance is short)."""
    threshold = zero_config.get("stage3_param_persistence_threshold", 100_000)
    large = sum(n for n, _ in params.values() if n > threshold)
    live = zero_config.get("stage3_max_live_parameters", 1_000_000_000)
    reuse = zero_config.get("stage3_max_reuse_distance", 1_000_000_000)
    return 0.0 if large <= live and large <= reuse else 1.0


def expected_volume(ds_config: dict, params: dict[str, tuple[int, bool]], world: int, accum: int,
                    param_bytes: int) -> Volume:
    """The formula for this ds_config (ZeRO stage, communication dtype, ZeRO-3 knobs)."""
    zero = ds_config.get("zero_optimization", {})
    grad_bytes = DTYPE_BYTES[ds_config.get("communication_data_type", "fp32")]
    if zero.get("stage", 0) == 0:
        return stage0_bytes(params, world, grad_bytes)
    if zero.get("stage", 0) == 3:
        threshold = zero.get("stage3_param_persistence_threshold", 100_000)
        return stage3_bytes(params, world, accum, grad_bytes, param_bytes, threshold, stage3_regather(zero, params))
    return stage2_bytes(params, world, accum, grad_bytes, param_bytes)


DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def counted_volume(metrics: dict[str, float]) -> Volume:
    """The trainer's comm/* metrics (one logged window) as a Volume; scalars (a few bytes) left out."""
    get = lambda op: metrics.get(f"comm/{op}/bytes_per_step", 0.0)  # noqa: E731
    small = lambda op: get(op) if get(op) > 64 else 0.0  # noqa: E731  (grad-norm / overflow scalars)
    return Volume(all_reduce=small("all_reduce"), all_gather=get("all_gather_into_tensor"),
                  reduce_scatter=get("reduce_scatter_tensor"))


def parameter_sizes(model) -> dict[str, tuple[int, bool]]:
    """{name: (elements, trainable)} of a model (ZeRO-3 partitioned parameters report their full size)."""
    return {n: (int(getattr(p, "ds_numel", p.numel())), p.requires_grad) for n, p in model.named_parameters()}


def ring_wire_bytes(op: str, full_bytes: float, world: int) -> float:
    """Bytes each GPU sends in a ring collective over `world` GPUs, for a full buffer of `full_bytes`."""
    if world <= 1:
        return 0.0
    factor = 2 * (world - 1) / world if op == "all_reduce" else (world - 1) / world
    return factor * full_bytes
