"""t2i_ds against what a user would pick instead, side by side in one run, each as a share of this machine's matmul rate.

Parts (`--parts`, all by default):

    limit     fp32 matmul GFLOP/s of this CPU (square 2048, at 1 thread and at all threads).
    generate  `t2i_ds.sampling.generate_images` (fast loop) vs transformers `generate()` on the same weights, loaded
              from `t2i_ds.model.hf.save_hf`'s output (what `t2i_ds.export` writes), same prompts, same number of
              image tokens, KV cache on, CFG 3.0, greedy over the image ids in every contestant (so the codes can be
              compared: `codes_equal`). Two transformers forms (t2i_ds.model.hf.hf_generate_codes):
                hf_guidance  transformers' own CFG: guidance_scale + negative_prompt_ids (a second forward over the
                             unconditional rows each step), suppress_tokens for the non-image ids;
                hf_doubled   the fairer form: one forward over [cond; uncond] rows, CFG and the image-id restriction in
                             one logits processor.
              Models: demo (the `make demo` model and vocabulary, 64 image tokens) and open_lm_1b_2l (open_lm-1b cut
              to 2 layers, the paper's 66,822-row vocabulary, the first 32 image tokens); batch 1, 8, 32.
    train     tokens/s and peak RSS of one training step at dim 512 (open_lm_1b's block, 2 layers, 8 heads), the
              paper's vocabulary and sequence (1,152), micro-batch 1, fp32, each contestant in its own process:
                t2i_ds       `python -m t2i_ds.train` (DeepSpeed engine, 1 rank, ds_configs/zero0.json: the one-GPU
                             config; chunked CE: the fused CE's CPU path, never the full logits), the trainer's own
                             tokens/s and host max RSS;
                t2i_ds_zero2 the same with ds_configs/zero2.json (what ZeRO's bookkeeping costs on one rank);
                plain        the same model in a plain PyTorch loop: torch AdamW, full logits, F.cross_entropy;
                hf_trainer   transformers' Trainer on the exported model (StableLm).
    load      building open_lm_1b (all 24 layers, 66,822 rows, random weights written here: nothing is downloaded)
              from its file, page cache warm, each in its own process: t2i_ds (`build_loaded` over the memory-mapped
              .safetensors), transformers `from_pretrained` of the exported directory; and the previous t2i_ds way
              (random init, then `load_into`) at --before-layers layers. Seconds to the model, then one forward (every
              weight read), and the peak RSS against the bytes of the weights.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode over one untimed run of each contestant (transformers
gets credit for the FLOPs it spends, e.g. the full-vocabulary head); `same_shape_gflops` is the rate of the step's
own matmuls alone at the same shapes (its linear layers at its row count), `share_of_same_shape` the contestant's
achieved rate over it. Every row records device, threads, versions, commit, date and the load average (1 min) before
and after its measurement: the machine is shared, read the ratios with it. Fastest of `--repeats`, alternating.

    python benchmarks/bench_peers.py --threads 1                      # the table in benchmarks/README.md
    python benchmarks/bench_peers.py --parts generate --models demo
    python benchmarks/bench_peers.py --smoke --out /tmp/peers.jsonl  # tiny shapes, in-process, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PARTS = ("limit", "generate", "train", "load")
GEN_CONTESTANTS = ("t2i_ds", "hf_guidance", "hf_doubled")
TRAIN_CONTESTANTS = ("t2i_ds", "t2i_ds_zero2", "plain", "hf_trainer")
DS_CONFIGS = {"t2i_ds": "zero0.json", "t2i_ds_zero2": "zero2.json"}  # the trainer's contestants
LOAD_CONTESTANTS = ("t2i_ds", "hf_from_pretrained", "t2i_ds_before")


# ------------------------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    """Wait for the device's queued work before reading a clock (CPU: nothing queued)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def environment(device: str = "cpu", dtype: str = "fp32") -> dict:
    from t2i_ds.provenance import git_revision

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "deepspeed", "safetensors"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": git_revision(),
            **versions, "device": torch.cuda.get_device_name(0) if torch.device(device).type == "cuda" else cpu_name(),
            "dtype": dtype, "cores": os.cpu_count(), "threads": torch.get_num_threads()}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def peak_rss_gib() -> float:
    from t2i_ds.trainer.metrics import host_peak_rss_gib  # VmHWM: ru_maxrss counts the parent's peak (see there)

    return host_peak_rss_gib()


_FORMULAS: list = []


def register_custom_op_flops() -> None:
    """FlopCounterMode counts aten ops; the project's fused loss is one custom op (t2i::lce_sum, the chunked CE's
    CPU path: logits, dh and dw GEMMs inside), opaque to it. Its formula, registered once: 2·N·H·V per GEMM
    (the logits, then dh and dw when they are needed)."""
    if _FORMULAS:
        return
    from torch.utils.flop_counter import register_flop_formula

    import t2i_kernels.ce_sum  # noqa: F401  (registers torch.ops.t2i.lce_sum)

    @register_flop_formula(torch.ops.t2i.lce_sum)
    def lce_sum_flops(h, w, targets, ignore_index, chunk_tokens, need_dh, need_dw, *args, out_shape=None, **kwargs):
        (n, hid), v = h, w[0]
        return 2 * n * hid * v * (1 + int(need_dh) + int(need_dw))

    _FORMULAS.append(lce_sum_flops)


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    register_custom_op_flops()
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------------------------------
# The limit: matmul rate
# ------------------------------------------------------------------------------------------------------------------
def time_best(fn, repeats: int, device: str = "cpu") -> float:
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(m: int, k: int, n: int, threads: int, repeats: int = 5, device: str = "cpu",
                  dtype: torch.dtype = torch.float32) -> float:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype)
        return 2 * m * k * n / time_best(lambda: F.linear(a, b), repeats, device) / 1e9
    finally:
        torch.set_num_threads(old)


def bench_limit(a, env: dict) -> list[dict]:
    gpu = torch.device(a.device).type == "cuda"
    size = 256 if a.smoke else 8192 if gpu else 2048
    rows = []
    for threads in [torch.get_num_threads()] if gpu else sorted({1, os.cpu_count() or 1}):
        before = load1()
        g = matmul_gflops(size, size, size, threads, 2 if a.smoke else 5, a.device, DTYPES[a.dtype])
        rows.append({"bench": "peers_limit", **env, "threads": threads, "shape": [size, size, size], "gflops": g,
                     "load1_before": before, "load1_after": load1()})
        print(f"[limit] {a.dtype} matmul {size}^3 on {a.device}, {threads} thread(s): {g:.1f} GFLOP/s", flush=True)
    return rows


def same_shape_step(args, rows: int | list[int], head_rows: int, sampled: int | None = None, device: str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """(step, flops): the linear layers of forwards over `rows` rows each (a list: one forward per entry, e.g. a
    prefill then every decode step; one layer's weights n_layers times), and the head (`head_rows` output rows) over
    the `sampled` rows of each forward (default: all of them): the matmul work of the model's own shapes alone,
    which bounds what the model can reach on this machine."""
    d, h = args.dim, args.ffn_hidden
    shapes = [(3 * d, d), (d, d), (2 * h, d), (d, h)]
    new = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    ws = [new(n, k) for n, k in shapes]
    head = new(head_rows, d)
    counts = [rows] if isinstance(rows, int) else list(rows)
    xs = {m: {k: new(m, k) for k in {d, h}} for m in set(counts)}
    last = {m: xs[m][d][: min(m, sampled or m)] for m in xs}  # the rows the head sees

    def step():
        for m in counts:
            for _ in range(args.n_layers):
                for w in ws:
                    F.linear(xs[m][w.shape[1]], w)
            F.linear(last[m], head)

    layer = args.n_layers * sum(n * k for n, k in shapes)
    return step, 2 * sum(m * layer + last[m].shape[0] * head_rows * d for m in counts)


def same_shape_gflops(args, rows: int, head_rows: int, repeats: int, device: str = "cpu",
                      dtype: torch.dtype = torch.float32) -> float:
    step, flops = same_shape_step(args, rows, head_rows, device=device, dtype=dtype)
    return flops / time_best(step, repeats, device) / 1e9


# ------------------------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------------------------
def gen_model(name: str):
    """(open_lm model, vocab) with random weights, eval mode, fp32, on the CPU (the same weights for every device),
    SDPA attention."""
    from t2i_ds.model.args import model_preset
    from t2i_ds.model.transformer import build_model
    from t2i_ds.vocab import Vocab, tiny_vocab

    torch.manual_seed(0)
    if name == "demo":
        from t2i_ds.demo.preset import demo

        vocab = demo().vocab.build()
        args = model_preset("demo", vocab_size=vocab.size, seq_len=vocab.seq_len)
    elif name == "open_lm_1b_2l":
        vocab = replace(Vocab(), image_tokens=32)  # the first 32 codes of every image
        args = model_preset("open_lm_1b", vocab_size=vocab.size, n_layers=2)
    elif name == "smoke":
        vocab = tiny_vocab()
        args = model_preset("debug", vocab_size=vocab.size, seq_len=vocab.seq_len)
    else:
        raise ValueError(f"unknown model {name!r}")
    args = args.replace(loss_impl="torch", attn_backend="sdpa")
    return build_model(args, vocab.modality_bounds).eval(), vocab


def captions(vocab, n: int) -> list[list[int]]:
    """n captions of 6..15 tokens (different lengths: left padding, as in real batches)."""
    g = torch.Generator().manual_seed(1)
    top = min(vocab.real_text_size, vocab.text_size)
    return [torch.randint(0, top, (min(6 + i % 10, vocab.max_caption_tokens),), generator=g).tolist() for i in range(n)]


def bench_generate(a, env: dict, tmp: Path) -> list[dict]:
    import transformers

    from t2i_ds.model.hf import hf_generate_codes, save_hf
    from t2i_ds.sampling import generate_images

    rows, dtype = [], DTYPES[a.dtype]
    for name in a.models:
        model, vocab = gen_model(name)
        save_hf(model.state_dict(), model.args, tmp / name, vocab)  # fp32, as t2i_ds.export writes it
        model = model.to(a.device, dtype)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / name), dtype=dtype).to(a.device).eval()
        for batch in a.batches:
            caps = captions(vocab, batch)
            run = {
                "t2i_ds": lambda: generate_images(model, vocab, caps, cfg_scale=a.cfg_scale, top_k=1, batch_size=batch),
                "hf_guidance": lambda: hf_generate_codes(hf, vocab, caps, a.cfg_scale, "guidance"),
                "hf_doubled": lambda: hf_generate_codes(hf, vocab, caps, a.cfg_scale, "doubled"),
            }
            codes = {c: run[c]() for c in GEN_CONTESTANTS}  # warm-up (builds the sampling op) and the codes
            flops = {c: count_flops(run[c]) for c in GEN_CONTESTANTS}
            prompt = max(len(vocab.prompt(c)) for c in caps)  # the prefill: 2b rows of the padded prompt, then
            steps = [2 * batch * prompt] + [2 * batch] * (vocab.image_tokens - 1)  # one 2b-row forward per code
            mm_step, mm_flops = same_shape_step(model.args, steps, vocab.image_size, 2 * batch, a.device, dtype)
            run["matmuls"] = mm_step
            mm_step()  # the decode's matmuls alone
            times = {c: [] for c in run}
            before = load1()
            for _ in range(a.repeats):  # alternate: every contestant (and the limit) sees the same background load
                for c in run:
                    sync(a.device)
                    t = time.perf_counter()
                    run[c]()
                    sync(a.device)
                    times[c].append(time.perf_counter() - t)
            after = load1()
            limit = mm_flops / min(times["matmuls"]) / 1e9
            for c in GEN_CONTESTANTS:
                best = min(times[c])
                rows.append({
                    "bench": "peers_generate", **env, "model": name, "contestant": c, "batch": batch,
                    "image_tokens": vocab.image_tokens, "vocab_size": vocab.size, "cfg_scale": a.cfg_scale,
                    "sampling": "greedy over image ids", "seconds": [round(x, 4) for x in times[c]],
                    "best_seconds": round(best, 4), "images_per_s": batch / best,
                    "codes_equal": bool(torch.equal(codes[c], codes["t2i_ds"])), "gflop": flops[c] / 1e9,
                    "achieved_gflops": flops[c] / best / 1e9, "same_shape_gflops": limit,
                    "share_of_same_shape": flops[c] / best / 1e9 / limit, "load1_before": before, "load1_after": after,
                })
                print(f"[generate] {name} b={batch} {c}: {batch / best:.3g} images/s, "
                      f"{flops[c] / best / 1e9:.1f} GFLOP/s ({100 * flops[c] / best / 1e9 / limit:.0f}% of same-shape "
                      f"{limit:.1f}), codes equal: {rows[-1]['codes_equal']} (load {before}-{after})", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Training (each contestant in a child process: its own peak RSS)
# ------------------------------------------------------------------------------------------------------------------
def train_shape(a) -> dict:
    """The training shape: smoke (debug model), the CPU's (dim 512: the math dominates, a step in seconds) or a
    GPU's (open_lm-1b's dims, --train-layers of its 24 layers, micro-batch 8); device and dtype ride along."""
    target = {"device": a.device, "dtype": a.dtype}
    if a.smoke:
        return {"preset": "debug", "overrides": {}, "micro_batch": 2, "steps": 2, "warmup": 1, **target}
    if torch.device(a.device).type == "cuda":
        return {"preset": "open_lm_1b", "overrides": {"n_layers": a.train_layers}, "micro_batch": 8, "steps": 5,
                "warmup": 3, **target}
    return {"preset": "open_lm_1b", "overrides": {"dim": 512, "n_layers": 2, "n_heads": 8}, "micro_batch": 1,
            "steps": 4, "warmup": 2, **target}


def peak_memory(device: str) -> dict:
    """Peak host RSS, and on a GPU the peak of torch's allocator (what the comparison of memory is about there)."""
    out = {"peak_rss_gib": peak_rss_gib()}
    if torch.device(device).type == "cuda":
        out["peak_device_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def train_config(shape: dict, run_dir: Path, loss_impl: str):
    """The run Config of the training benchmark: synthetic data, the paper's vocabulary (debug's in smoke)."""
    from t2i_ds.config import apply_overrides, preset

    base = "debug" if shape["preset"] == "debug" else "paper_synthetic"
    seq = preset(base).vocab.seq_len
    sets = [f"model.preset={shape['preset']}",
            f"model.overrides={json.dumps({**shape['overrides'], 'loss_impl': loss_impl, 'attn_backend': 'sdpa'})}",
            "train.data_source=synthetic", f"train.micro_batch={shape['micro_batch']}",
            f"train.tokens_per_step={shape['micro_batch'] * seq}",
            f"train.steps={shape['warmup'] + shape['steps']}", f"train.log_every={shape['steps']}",
            "train.ckpt_every=0", "train.save_final=false", f"train.run_dir={run_dir}"]
    return base, sets, apply_overrides(preset(base), sets)


def random_batch(vocab, micro_batch: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, vocab.size, (micro_batch, vocab.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def child_train(contestant: str, shape: dict, tmp: Path) -> dict:
    """One contestant's training steps: tokens/s over the steps after the warm-up, peak RSS, FLOPs of one step."""
    from t2i_ds.model.transformer import build_model
    from t2i_ds.trainer.parallelize import model_args

    device, gpu = shape["device"], torch.device(shape["device"]).type == "cuda"
    if contestant in DS_CONFIGS:  # the fused CE: its Triton kernels on a GPU, its chunked CPU path here
        loss_impl = "auto" if gpu else "chunked"
        base, sets, cfg = train_config(shape, tmp / "run", loss_impl)
        cmd = [sys.executable, "-m", "t2i_ds.train", "--ds_config", str(ROOT / "ds_configs" / DS_CONFIGS[contestant]),
               "--preset", base] + [x for s in sets for x in ("--set", s)]
        # the same threads as the other contestants (this child's): torch's default in a new process is every core
        env = {**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cuda" if gpu else "cpu"),
               "OMP_NUM_THREADS": str(torch.get_num_threads())}
        subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL)  # bf16 on a GPU (bf16: auto)
        last = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()][-1]
        vocab = cfg.vocab.build()
        model = build_model(model_args(cfg, vocab), vocab.modality_bounds).to(device)
        ids, tg = (t.to(device) for t in random_batch(vocab, shape["micro_batch"], 0))
        flops = count_flops(lambda: model(ids, tg).loss_sum.backward())
        memory = {"peak_rss_gib": last["mem/host_max_rss_gib"]}
        if gpu:
            memory["peak_device_gib"] = last["mem/peak_allocated_gib"]
        return {"tokens_per_s": last["perf/tokens_per_s_per_device"], **memory, "gflop_per_step": flops / 1e9,
                "loss_impl": loss_impl, "ds_config": DS_CONFIGS[contestant], "steps_timed": shape["steps"]}
    _, _, cfg = train_config(shape, tmp / "run", "torch")
    vocab = cfg.vocab.build()
    torch.manual_seed(0)
    model = build_model(model_args(cfg, vocab), vocab.modality_bounds).train()
    tokens = shape["micro_batch"] * vocab.seq_len
    if contestant == "plain":
        model = model.to(device)  # fp32 weights; bf16 as a user writes it: autocast
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
        autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=shape["dtype"] == "bf16")

        def step(i: int):
            ids, tg = (t.to(device) for t in random_batch(vocab, shape["micro_batch"], i))
            with autocast:
                logits = model(ids)  # (B, S, V): the full logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tg.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        flops = count_flops(lambda: step(-1))
        times = []
        for i in range(shape["warmup"] + shape["steps"]):
            t = time.perf_counter()
            step(i)
            sync(device)
            times.append(time.perf_counter() - t)
        timed = times[shape["warmup"]:]
        return {"tokens_per_s": tokens * len(timed) / sum(timed), **peak_memory(device),
                "gflop_per_step": flops / 1e9, "loss_impl": "full logits + F.cross_entropy",
                "steps_timed": len(timed)}
    if contestant == "hf_trainer":
        return child_hf_trainer(model, vocab, shape, tmp, tokens)
    raise ValueError(f"unknown contestant {contestant!r}")


def child_hf_trainer(model, vocab, shape: dict, tmp: Path, tokens: int) -> dict:
    import transformers

    from t2i_ds.model.hf import save_hf

    save_hf(model.state_dict(), model.args, tmp / "hf", vocab)
    del model
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "hf"))
    n = shape["warmup"] + shape["steps"]
    data = []
    for i in range(n * shape["micro_batch"]):
        ids = random_batch(vocab, 1, i)[0][0]
        data.append({"input_ids": ids, "labels": ids.clone()})  # transformers shifts the labels itself
    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            sync(device)
            self.t = time.perf_counter()

        def on_step_end(self, *args, **kwargs):  # after the optimizer step
            sync(device)
            times.append(time.perf_counter() - self.t)

    device = shape["device"]
    targs = transformers.TrainingArguments(
        output_dir=str(tmp / "hf_out"), per_device_train_batch_size=shape["micro_batch"], max_steps=n,
        learning_rate=3e-4, weight_decay=0.1, max_grad_norm=1.0, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=torch.device(device).type == "cpu",
        bf16=shape["dtype"] == "bf16", dataloader_num_workers=0, seed=0)
    trainer = transformers.Trainer(model=hf, args=targs, train_dataset=data, callbacks=[Clock()])
    trainer.train()
    timed = times[shape["warmup"]:]
    batch = {"input_ids": torch.stack([d["input_ids"] for d in data[: shape["micro_batch"]]]).to(hf.device)}
    flops = count_flops(lambda: hf(**batch, labels=batch["input_ids"]).loss.backward())
    return {"tokens_per_s": tokens * len(timed) / sum(timed), **peak_memory(device),
            "gflop_per_step": flops / 1e9, "loss_impl": "transformers (full logits)", "steps_timed": len(timed)}


def bench_train(a, env: dict, tmp: Path) -> list[dict]:
    from t2i_ds.model.args import model_preset

    shape = train_shape(a)
    _, _, cfg = train_config(shape, tmp / "cfg", "torch")
    vocab = cfg.vocab.build()
    args = model_preset(shape["preset"], **shape["overrides"], vocab_size=vocab.size)
    tokens = shape["micro_batch"] * vocab.seq_len
    # forward matmuls at the step's token count, in the step's compute dtype
    limit = same_shape_gflops(args, tokens, vocab.size, 2, a.device, DTYPES[a.dtype])
    skipped = {}
    if "hf_trainer" in a.train_contestants and importlib.util.find_spec("accelerate") is None:
        skipped["hf_trainer"] = "accelerate is not installed (transformers' Trainer needs accelerate>=1.1.0)"
        print(f"[train] hf_trainer skipped: {skipped['hf_trainer']}", flush=True)
    results = {c: [] for c in a.train_contestants if c not in skipped}
    before = load1()
    for r in range(a.train_repeats):
        for c in results:
            results[c].append(run_child({"part": "train", "contestant": c, "shape": shape}, tmp / f"train_{c}_{r}",
                                        inproc=a.smoke))
            got = results[c][-1]
            gpu_mem = f", peak device {got['peak_device_gib']:.2f} GiB" if "peak_device_gib" in got else ""
            print(f"[train] {c}: {got['tokens_per_s']:.0f} tokens/s, peak RSS {got['peak_rss_gib']:.2f} GiB{gpu_mem}",
                  flush=True)
    after = load1()
    rows = []
    for c, rs in results.items():
        best = max(rs, key=lambda x: x["tokens_per_s"])
        achieved = best["gflop_per_step"] * best["tokens_per_s"] / tokens
        rows.append({"bench": "peers_train", **env, "contestant": c, "dim": args.dim, "n_layers": args.n_layers,
                     "device_type": torch.device(a.device).type,
                     "vocab_size": vocab.size, "seq_len": vocab.seq_len, "micro_batch": shape["micro_batch"],
                     "tokens_per_s_all": [round(x["tokens_per_s"], 1) for x in rs], **best,
                     "achieved_gflops": achieved, "same_shape_gflops": limit, "share_of_same_shape": achieved / limit,
                     "load1_before": before, "load1_after": after})
    rows += [{"bench": "peers_train", **env, "contestant": c, "skipped": why} for c, why in skipped.items()]
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------
def write_safetensors(path: Path, tensors) -> int:
    """Stream (name, shape, fill) into a .safetensors file one tensor at a time (never the whole model in memory).
    Returns the bytes of the weights."""
    items = list(tensors)
    header, offset = {}, 0
    for name, shape, _ in items:
        n = 4 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, shape, fill in items:
            f.write(fill(shape).contiguous().numpy().tobytes())
    return offset


def open_lm_tensors(args, seed: int = 0):
    """(name, shape, fill) of an open_lm model with random weights (no inv_freq: the loader computes it)."""
    from t2i_ds.model.transformer import build_model

    g = torch.Generator().manual_seed(seed)
    fill = lambda shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    meta = build_model(args, device="meta", init=False)
    return [(k, tuple(v.shape), fill) for k, v in meta.state_dict().items() if not k.endswith("inv_freq")]


def hf_tensors(args, seed: int = 0):
    """(name, shape, fill) under transformers' names: t2i_ds.model.hf.to_hf_state_dict over a meta state dict."""
    from t2i_ds.model.hf import to_hf_state_dict

    meta = {n: torch.empty(s, device="meta") for n, s, _ in open_lm_tensors(args, seed)}
    g = torch.Generator().manual_seed(seed)
    fill = lambda shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    return [(k, tuple(v.shape), fill) for k, v in to_hf_state_dict(meta, args).items()]


def child_load(contestant: str, spec: dict) -> dict:
    from t2i_ds.model.args import ModelArgs

    args = ModelArgs(**spec["args"])
    rss0 = peak_rss_gib()
    t = time.perf_counter()
    if contestant == "t2i_ds":
        from safetensors.torch import load_file

        from t2i_ds.model.checkpoint import build_loaded

        model = build_loaded(args, tuple(spec["bounds"]), load_file(spec["open_lm_file"]))
        forward = lambda ids: model(ids)  # noqa: E731
    elif contestant == "t2i_ds_before":
        from safetensors.torch import load_file

        from t2i_ds.model.checkpoint import load_into
        from t2i_ds.model.transformer import Transformer

        model = Transformer(args, tuple(spec["bounds"]))  # random init, then the weights copied over it
        load_into(model, load_file(spec["open_lm_file"]))
        forward = lambda ids: model(ids)  # noqa: E731
    elif contestant == "hf_from_pretrained":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(spec["hf_dir"])
        forward = lambda ids: model(ids).logits  # noqa: E731
    else:
        raise ValueError(f"unknown contestant {contestant!r}")
    load_s = time.perf_counter() - t
    rss_loaded = peak_rss_gib()
    with torch.no_grad():
        t = time.perf_counter()
        forward(torch.zeros(1, 4, dtype=torch.long))  # reads every weight
        forward_s = time.perf_counter() - t
    return {"load_seconds": load_s, "first_forward_seconds": forward_s, "rss_after_imports_gib": rss0,
            "peak_rss_after_load_gib": rss_loaded, "peak_rss_gib": peak_rss_gib(), "layers": args.n_layers}


def bench_load(a, env: dict, tmp: Path) -> list[dict]:
    from t2i_ds.model.args import model_preset
    from t2i_ds.model.hf import CONFIG, hf_config
    from t2i_ds.vocab import Vocab, tiny_vocab

    vocab = tiny_vocab() if a.smoke else Vocab()
    name = "debug" if a.smoke else "open_lm_1b"
    rows = []
    for layers, contestants in ((a.load_layers, ("t2i_ds", "hf_from_pretrained")), (a.before_layers, ("t2i_ds", "t2i_ds_before"))):
        if not layers or not any(c in a.load_contestants for c in contestants):
            continue
        args = model_preset(name, vocab_size=vocab.size, n_layers=layers, loss_impl="torch", attn_backend="sdpa")
        work = Path(a.workdir or tmp) / f"load_{name}_{layers}"
        work.mkdir(parents=True, exist_ok=True)
        ol, hfd = work / "open_lm.safetensors", work / "hf"
        hfd.mkdir(exist_ok=True)
        nbytes = write_safetensors(ol, open_lm_tensors(args))
        if "hf_from_pretrained" in contestants:
            write_safetensors(hfd / "model.safetensors", hf_tensors(args))
            (hfd / CONFIG).write_text(json.dumps(hf_config(args, vocab)))
        for f in (ol, hfd / "model.safetensors"):  # into the page cache: the claim is about a warm file
            if f.exists():
                with open(f, "rb") as fh:
                    while fh.read(1 << 26):
                        pass
        spec = {"args": {k: v for k, v in args.__dict__.items()}, "bounds": list(vocab.modality_bounds),
                "open_lm_file": str(ol), "hf_dir": str(hfd)}
        results = {c: [] for c in contestants if c in a.load_contestants}
        before = load1()
        for _ in range(a.load_repeats):
            for c in results:
                results[c].append(run_child({"part": "load", "contestant": c, "spec": spec}, tmp, inproc=a.smoke))
                r = results[c][-1]
                print(f"[load] {name} {layers} layers {c}: {r['load_seconds']:.2f} s, first forward "
                      f"{r['first_forward_seconds']:.2f} s, peak RSS {r['peak_rss_gib']:.2f} GiB "
                      f"(weights {nbytes / 2**30:.2f} GiB)", flush=True)
        after = load1()
        for c, rs in results.items():
            best = min(rs, key=lambda x: x["load_seconds"])
            rows.append({"bench": "peers_load", **env, "model": name, "contestant": c, "weights_gib": nbytes / 2**30,
                         "load_seconds_all": [round(x["load_seconds"], 3) for x in rs], **best,
                         "peak_rss_over_weights": best["peak_rss_gib"] / (nbytes / 2**30),
                         "load1_before": before, "load1_after": after})
        if not a.workdir:
            for f in (ol, hfd / "model.safetensors"):
                f.unlink(missing_ok=True)
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Children, table, main
# ------------------------------------------------------------------------------------------------------------------
def run_child(job: dict, tmp: Path, inproc: bool) -> dict:
    """Run one measurement in a fresh process (its own peak RSS and threads), or in this one (smoke)."""
    tmp.mkdir(parents=True, exist_ok=True)
    if inproc:
        return child(job, tmp)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job), "--tmp", str(tmp),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def child(job: dict, tmp: Path) -> dict:
    if job["part"] == "train":
        return child_train(job["contestant"], job["shape"], tmp)
    return child_load(job["contestant"], job["spec"])


def markdown(rows: list[dict]) -> str:
    out = []
    gen = [r for r in rows if r["bench"] == "peers_generate"]
    if gen:
        out += ["| model | batch | image tokens | t2i_ds images/s | HF guidance images/s | ratio | HF doubled images/s | "
                "ratio | t2i_ds share of same-shape matmul | codes equal | load |", "|---" * 11 + "|"]
        keys = dict.fromkeys((r["model"], r["batch"]) for r in gen)
        for m, b in keys:
            by = {r["contestant"]: r for r in gen if (r["model"], r["batch"]) == (m, b)}
            o = by["t2i_ds"]
            out.append(f"| {m} | {b} | {o['image_tokens']} | {o['images_per_s']:.3g} | "
                       f"{by['hf_guidance']['images_per_s']:.3g} | {o['images_per_s'] / by['hf_guidance']['images_per_s']:.2f}x | "
                       f"{by['hf_doubled']['images_per_s']:.3g} | {o['images_per_s'] / by['hf_doubled']['images_per_s']:.2f}x | "
                       f"{100 * o['share_of_same_shape']:.0f}% | {all(r['codes_equal'] for r in by.values())} | "
                       f"{o['load1_before']}-{o['load1_after']} |")
    train = [r for r in rows if r["bench"] == "peers_train"]
    if train:
        base = {r["contestant"]: r for r in train}
        ours = base.get("t2i_ds")
        memory = "peak GPU GiB" if any("peak_device_gib" in r for r in train) else "peak RSS GiB"
        out += ["", f"| training step | tokens/s | t2i_ds / it | {memory} | GFLOP/step | share of same-shape matmul | load |",
                "|---" * 7 + "|"]
        for r in train:
            if "skipped" in r:
                out.append(f"| {r['contestant']} | skipped: {r['skipped']} |" + " |" * 5)
                continue
            rel = f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x" if ours else "-"
            out.append(f"| {r['contestant']} | {r['tokens_per_s']:.0f} | {rel} | {r.get('peak_device_gib', r['peak_rss_gib']):.2f} | "
                       f"{r['gflop_per_step']:.3g} | {100 * r['share_of_same_shape']:.0f}% | "
                       f"{r['load1_before']}-{r['load1_after']} |")
    load = [r for r in rows if r["bench"] == "peers_load"]
    if load:
        out += ["", "| loading | layers | seconds to the model | first forward s | peak RSS GiB | / weights | load |",
                "|---" * 7 + "|"]
        out += [f"| {r['contestant']} | {r['layers']} | {r['load_seconds']:.2f} | {r['first_forward_seconds']:.2f} | "
                f"{r['peak_rss_gib']:.2f} | {r['peak_rss_over_weights']:.2f} | {r['load1_before']}-{r['load1_after']} |"
                for r in load]
    lim = [r for r in rows if r["bench"] == "peers_limit"]
    if lim:
        out += ["", "| fp32 matmul | " + " | ".join(f"{r['threads']} thread(s)" for r in lim) + " |", "|---" * (1 + len(lim)) + "|",
                "| GFLOP/s | " + " | ".join(f"{r['gflops']:.1f}" for r in lim) + " |"]
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--models", nargs="+", default=["demo", "open_lm_1b_2l"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-contestants", nargs="+", choices=TRAIN_CONTESTANTS, default=list(TRAIN_CONTESTANTS))
    p.add_argument("--train-repeats", type=int, default=2)
    p.add_argument("--load-contestants", nargs="+", choices=LOAD_CONTESTANTS, default=list(LOAD_CONTESTANTS))
    p.add_argument("--load-layers", type=int, default=24, help="open_lm_1b layers for t2i_ds vs from_pretrained")
    p.add_argument("--before-layers", type=int, default=2,
                   help="layers for the previous way (init + copy: twice the weights' memory); 0 skips it")
    p.add_argument("--load-repeats", type=int, default=2)
    p.add_argument("--workdir", default="", help="keep the written weights here (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda: generation, training and the limit run there")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="generation's weights and the limit's matmuls; training: bf16 = DeepSpeed's bf16 (auto on "
                        "a GPU), torch.autocast in the plain loop, TrainingArguments(bf16=True) for the HF Trainer")
    p.add_argument("--train-layers", type=int, default=4, help="open_lm_1b layers of the training step on a GPU")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, children in-process: checks the script")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers.jsonl"))
    p.add_argument("--note", default="", help="recorded in every row (e.g. which change an A/B run measures)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.device(a.device).type == "cuda" else "cpu")
    if a.child:
        print("RESULT " + json.dumps(child(json.loads(a.child), Path(a.tmp))), flush=True)
        return 0
    if a.smoke:
        a.models, a.batches, a.repeats, a.train_repeats, a.load_repeats = ["smoke"], [2], 1, 1, 1
        a.load_layers, a.before_layers = 2, 2
        a.train_contestants = [c for c in a.train_contestants if c not in DS_CONFIGS]  # a DeepSpeed launch is not seconds
    if torch.device(a.device).type == "cuda" and "load" in a.parts:
        a.parts = [x for x in a.parts if x != "load"]  # host loading: the CPU's part
        print("[load] skipped on cuda: loading is measured on the host (--device cpu)", flush=True)
    env = environment(a.device, a.dtype)
    if a.note:
        env["note"] = a.note
    rows: list[dict] = []
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = {"limit": lambda tmp: bench_limit(a, env), "generate": lambda tmp: bench_generate(a, env, tmp),
             "train": lambda tmp: bench_train(a, env, tmp), "load": lambda tmp: bench_load(a, env, tmp)}
    with tempfile.TemporaryDirectory() as tmp:
        for part in a.parts:
            new = parts[part](Path(tmp))
            with open(out, "a") as f:  # after every part: a run stopped at a time limit keeps what it measured
                for r in new:
                    f.write(json.dumps(r) + "\n")
            rows += new
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
