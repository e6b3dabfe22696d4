"""The paper in miniature: every run of claims C1-C6 and the text-mixing extension, as one resumable sequence.

    cfg = full()                                   # or quick(): the same pipeline, tiny (a test)
    tasks = plan(cfg, Layout(Path("runs/replicate")), paragraphs)
    run_tasks(tasks)                               # t2i_ds.paper.runs: complete tasks are skipped
    claims = measure(cfg, layout)                  # per-claim, per-seed values and verdicts

The sequence (names are the run directories under OUT):

    prepare                 corpus splits, the NeoX subset tokenizer, the demo data captioned in it, corpus shards
    lm                      the text LM: `data.mode=text` on the corpus shards, probed once at its end; lm/text_lm.pt
    t2i/{pretrained,random}/s{seed}     C1, C2, C3 (probed along the way)
    t2i/mix/s{seed}         the extension: pretrained, `data.text_mix_ratio` of the batches corpus text
    uncond/{pretrained,random,<freeze presets>}/s{seed}          C4, C5 (`data.mode=unconditional`)
    align/s{seed}, t2i/aligned/s{seed}  C6: contrastive alignment, then its rows as the image-row init

Seeds: seed s sets train.seed, init.seed and data.seed of a run, so two runs of one seed see the same data
order and, where their shapes agree, the same initial draws.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from t2i_ds.paper import verdicts
from t2i_ds.paper.runs import Task, export_text_lm, read_result, train_demo

FREEZES = ("embed_output", "embed_output_norms", "embed_output_norms_first_half", "embed_output_norms_ffn")
NEOX_PAD = "<|endoftext|>"  # the pad input (never a target); this NeoX file has no <|padding|>
N_VAL = 16  # held-out demo images (unused by the claims; the demo data set's val split)


@dataclass(frozen=True)
class ReplicationConfig:
    """Sizes of the miniature and the verdict rule's bounds (docs/replication.md: fixed before the first run)."""

    seeds_init: int = 3
    """Seeds of the pre-trained vs random comparison (C1, C2, C3)."""
    seeds_other: int = 2
    """Seeds of every other comparison (C4, C5, C6, the extension)."""
    n_train: int = 4_000
    """Demo images (and captions) of the text-to-image data."""
    text_rows: int = 2_048
    """Most frequent NeoX ids of the corpus kept in the subset tokenizer (plus caption ids, merge ancestors, bytes)."""
    seqs_per_step: int = 8
    """Sequences per optimizer step of every run, in one micro-batch (the demo preset has 16)."""
    warmup_steps: int = 20
    """Linear LR warm-up of every run (then cosine to 0.1x of the demo preset's peak 2e-3)."""
    lm_steps: int = 300
    """Steps of text LM pre-training (sequences of lm_seq_len tokens)."""
    lm_seq_len: int = 128
    """Sequence length of the text LM's pre-training (the demo model's maximum)."""
    t2i_steps: int = 120
    """Steps of each text-to-image run."""
    uncond_steps: int = 100
    """Steps of each unconditional (image-only) run."""
    freezes: tuple[str, ...] = FREEZES
    """Freezing presets of C5 (the paper's four; quick() runs one)."""
    align_steps: int = 300
    """Steps of each contrastive alignment."""
    align_batch: int = 256
    """Pairs per contrastive batch."""
    log_every: int = 5
    """Steps between logged losses."""
    probes: int = 2
    """Forgetting probes per text-to-image run (evenly spaced, the last at its end)."""
    probe_bytes: int = 32_768
    """Bytes of held-out corpus paragraphs the probes' held-out loss reads."""
    text_mix_ratio: float = 0.2
    """Share of the extension's samples that are corpus text."""
    margin: float = 0.05
    """δ (nats): the largest loss difference that counts as "the same" (a 5% perplexity ratio)."""
    forgetting_bound: float = 0.5
    """C3 holds when more than this share of the LM's held-out advantage over random init is lost."""
    plateau_at: float = 0.2
    """C6: the share of the alignment's steps by which it should have done most of its decrease."""
    plateau_bound: float = 0.8
    """C6: "most": this share of the whole decrease of the contrastive loss."""
    final_window: float = 0.1
    """A run's final value of a loss: the mean of its values logged in the last final_window of its steps."""

    def __post_init__(self) -> None:
        ints = ("seeds_init", "seeds_other", "n_train", "text_rows", "seqs_per_step", "lm_steps", "lm_seq_len", "t2i_steps",
                "uncond_steps", "align_steps", "align_batch", "log_every", "probes", "probe_bytes")
        bad = [n for n in ints if getattr(self, n) < 1]
        if bad:
            raise ValueError(f"ReplicationConfig fields {bad} must be >= 1")
        if not self.freezes or not set(self.freezes) <= set(FREEZES):
            raise ValueError(f"ReplicationConfig.freezes={self.freezes} must be a non-empty subset of {FREEZES}")
        if not 0 <= self.text_mix_ratio < 1 or not 0 < self.final_window <= 1 or not 0 < self.plateau_at < 1:
            raise ValueError(f"ReplicationConfig ratios out of range: {self}")


def full() -> ReplicationConfig:
    """The committed run (docs/replication.md)."""
    return ReplicationConfig()


def quick() -> ReplicationConfig:
    """The whole pipeline in seconds, one seed: a test of the machinery, not of the claims."""
    return ReplicationConfig(seeds_init=1, seeds_other=1, n_train=64, text_rows=256, warmup_steps=1, lm_steps=3, t2i_steps=3,
                             uncond_steps=2, freezes=FREEZES[:1], align_steps=3, align_batch=16, log_every=1, probes=1, probe_bytes=2_048)


@dataclass(frozen=True)
class Layout:
    """Where everything of one replication lives under `out`."""

    out: Path

    @property
    def prepare(self) -> Path:
        return self.out / "prepare"

    @property
    def data(self) -> Path:
        return self.prepare / "data"  # the demo data set (t2i_ds.demo.data layout)

    @property
    def corpus(self) -> Path:
        return self.prepare / "corpus"

    @property
    def lm(self) -> Path:
        return self.out / "lm"

    @property
    def lm_checkpoint(self) -> Path:
        return self.lm / "text_lm.pt"

    def run(self, group: str, arm: str, seed: int) -> Path:
        return self.out / group / arm / f"s{seed}"

    def align(self, seed: int) -> Path:
        return self.out / "align" / f"s{seed}"


# ---- preparation: corpus, tokenizer, captions, corpus shards ---------------------------------------------------
def prepare(cfg: ReplicationConfig, layout: Layout, paragraphs: list[str], run_dir: Path) -> dict:
    """Corpus splits, the subset tokenizer, the demo data captioned in it and the LM's text shards."""
    from tokenizers import Tokenizer

    from t2i_ds.data.bpe_subset import count_ids, subset_bpe
    from t2i_ds.data.tokenizers import DEFAULT_TEXT_TOKENIZER
    from t2i_ds.demo import data as demo_data
    from t2i_ds.demo import shapes
    from t2i_ds.paper.corpus import write_corpus

    corpus = write_corpus(paragraphs, layout.corpus)
    probe = _probe_text(corpus.heldout.read_text(encoding="utf-8"), cfg.probe_bytes)
    (layout.corpus / "probe.txt").write_text(probe, encoding="utf-8")
    neox = Tokenizer.from_file(str(DEFAULT_TEXT_TOKENIZER))
    train_text = corpus.train.read_text(encoding="utf-8").splitlines()
    counts = count_ids(neox, train_text)
    captions = [s.caption for seed, n in ((0, cfg.n_train), (1, N_VAL)) for s in shapes.generate(n, seed, shapes.IMAGE_SIZE)]
    caption_ids = set(count_ids(neox, captions))  # the streams make_demo_dataset draws (train: seed 0, val: 1)
    neox_json = json.loads(DEFAULT_TEXT_TOKENIZER.read_text(encoding="utf-8"))
    subset = subset_bpe(neox_json, counts, cfg.text_rows, caption_ids | {neox.token_to_id(NEOX_PAD)})
    tok_path = subset.save(run_dir / "neox_subset.json")
    tok = Tokenizer.from_file(str(tok_path))
    # 64: a tidy row count for the matmuls; the k-means tokenizer its recorded runs used (docs/replication.md)
    sizes = demo_data.DemoSizes(tokenizer="patch_kmeans", text_size=_round_up(subset.size, 64))
    demo_data.make_demo_dataset(layout.data, cfg.n_train, N_VAL, 0, sizes, text_tok=tok, pad_token=NEOX_PAD)
    chunks = write_text_shards(tok, train_text, layout.corpus / "shards", cfg.lm_seq_len - 4,
                               demo_data.load_demo_vocab(layout.data).image_tokens)
    return {**corpus.sizes(), "paragraphs": len(paragraphs), "probe_bytes": len(probe.encode()),
            "neox_ids_in_corpus": len(counts), "subset_ids": subset.size,
            "text_rows": sizes.text_size, "lm_chunks": chunks, "caption_ids": len(caption_ids)}


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _probe_text(heldout: str, limit: int) -> str:
    """The first held-out paragraphs, whole, up to `limit` bytes (at least one)."""
    out, size = [], 0
    for para in heldout.splitlines():
        if out and size + len(para.encode()) + 1 > limit:
            break
        out.append(para)
        size += len(para.encode()) + 1
    return "\n".join(out) + "\n"


def write_text_shards(tok, paragraphs: list[str], out_dir: Path, length: int, image_tokens: int) -> int:
    """The corpus as consecutive `length`-token chunks of the paragraphs joined by newlines, one token-shard record
    each, the chunk as its caption (read by `data.mode=text`, which never reads the codes: all zero). Returns
    the number of chunks."""
    from t2i_ds.data.shards import TokenShardWriter

    newline = tok.encode("\n", add_special_tokens=False).ids
    ids: list[int] = []
    for enc in tok.encode_batch(paragraphs, add_special_tokens=False):
        ids += enc.ids + newline
    meta = {"image_tokenizer": {"name": "none (text-only records)"}, "text_tokenizer": {"name": "neox_subset"}}
    writer = TokenShardWriter(out_dir, prefix="text", samples_per_shard=2000, meta=meta)
    codes = np.zeros(image_tokens, dtype=np.uint16)
    n = len(ids) // length
    for i in range(n):
        writer.write(f"text_{i:07d}", codes, ids[i * length : (i + 1) * length], "")
    writer.close()
    return n


# ---- the runs ----------------------------------------------------------------------------------------------------
def _seq_len(layout: Layout) -> int:
    return json.loads((layout.data / "demo_vocab.json").read_text())["seq_len"]


def _common(cfg: ReplicationConfig, seed: int, steps: int, seq_len: int) -> list[str]:
    return [f"train.seed={seed}", f"init.seed={seed}", f"data.seed={seed}", f"train.steps={steps}",
            f"train.log_every={cfg.log_every}", f"train.micro_batch={cfg.seqs_per_step}",
            f"train.tokens_per_step={cfg.seqs_per_step * seq_len}", f"optim.warmup_steps={cfg.warmup_steps}"]


def _probes(layout: Layout, every: int) -> list[str]:
    return [f"train.probe_every={every}", f"train.probe_heldout={layout.corpus / 'probe.txt'}"]


def lm_overrides(cfg: ReplicationConfig, layout: Layout) -> list[str]:
    return [*_common(cfg, 0, cfg.lm_steps, cfg.lm_seq_len), f"vocab.seq_len={cfg.lm_seq_len}",
            f"data.path={layout.corpus / 'shards'}", "data.mode=text", "data.caption_dropout=0.0",
            *_probes(layout, cfg.lm_steps)]


def arm_overrides(cfg: ReplicationConfig, layout: Layout, group: str, arm: str, seed: int) -> list[str]:
    """The `--set` overrides of one run: group t2i or uncond, arm pretrained / random / mix / aligned / a freeze."""
    steps = cfg.t2i_steps if group == "t2i" else cfg.uncond_steps
    sets = [*_common(cfg, seed, steps, _seq_len(layout)), "train.save_final=false"]  # only the LM's weights are read
    if arm != "random":
        sets += ["init.mode=pretrained", f"init.checkpoint={layout.lm_checkpoint}"]
    if group == "uncond":
        sets += ["data.mode=unconditional", "data.caption_dropout=0.0"]
        return sets + ([f"train.freeze={arm}"] if arm in cfg.freezes else [])
    sets += _probes(layout, max(1, steps // cfg.probes))
    if arm == "mix":
        sets += [f"data.text_mix_ratio={cfg.text_mix_ratio}", f"data.text_path={layout.corpus / 'train.txt'}"]
    if arm == "aligned":
        sets += ["init.new_rows=aligned", f"init.aligned_rows={layout.align(seed) / 'aligned_rows.safetensors'}"]
    return sets


def _train_task(cfg: ReplicationConfig, layout: Layout, group: str, arm: str, seed: int) -> Task:
    run_dir = layout.run(group, arm, seed)
    return Task(f"{group}/{arm}/s{seed}", run_dir,
                lambda d: train_demo(d, arm_overrides(cfg, layout, group, arm, seed), layout.data))


def _lm(cfg: ReplicationConfig, layout: Layout, run_dir: Path) -> dict:
    train_demo(run_dir, lm_overrides(cfg, layout), layout.data)
    export_text_lm(run_dir, layout.lm_checkpoint)
    return {"checkpoint": str(layout.lm_checkpoint)}


def _align(cfg: ReplicationConfig, layout: Layout, seed: int, run_dir: Path) -> dict:
    from t2i_ds.demo.data import load_demo_vocab
    from t2i_ds.paper.alignment import AlignConfig, AlignVocab, run_alignment

    vocab = load_demo_vocab(layout.data)
    acfg = AlignConfig(batch_size=cfg.align_batch, steps=cfg.align_steps, seed=seed, log_every=cfg.log_every)
    run_alignment(str(layout.data / "train"), str(layout.lm_checkpoint), run_dir, acfg,
                  AlignVocab(vocab.text_size, vocab.real_text_size, vocab.image_size),
                  tokenizer=str(layout.data / "tokenizer.json"), n_report=8)
    return {}


def plan(cfg: ReplicationConfig, layout: Layout, paragraphs: Callable[[], list[str]]) -> list[Task]:
    """Every task of the replication, in an order where each finds what it reads; `paragraphs()` reads the corpus
    (only when `prepare` has not run yet)."""
    tasks = [Task("prepare", layout.prepare, lambda d: prepare(cfg, layout, paragraphs(), d)),
             Task("lm", layout.lm, lambda d: _lm(cfg, layout, d))]
    for seed in range(cfg.seeds_init):
        tasks += [_train_task(cfg, layout, "t2i", arm, seed) for arm in ("pretrained", "random")]
    for seed in range(cfg.seeds_other):
        tasks.append(_train_task(cfg, layout, "t2i", "mix", seed))
        tasks += [_train_task(cfg, layout, "uncond", arm, seed) for arm in ("pretrained", "random", *cfg.freezes)]
        tasks.append(Task(f"align/s{seed}", layout.align(seed), lambda d, s=seed: _align(cfg, layout, s, d)))
        tasks.append(_train_task(cfg, layout, "t2i", "aligned", seed))
    return tasks


# ---- measurements and claims ---------------------------------------------------------------------------------
def curve(run_dir: Path, tag: str) -> tuple[np.ndarray, np.ndarray]:
    c = read_result(run_dir)["curves"][tag]
    return np.asarray(c["steps"], dtype=np.float64), np.asarray(c["values"], dtype=np.float64)


def final(cfg: ReplicationConfig, run_dir: Path, tag: str) -> float:
    """Mean of the values logged in the last `final_window` of the run's steps."""
    steps, values = curve(run_dir, tag)
    return float(values[steps >= steps[-1] * (1 - cfg.final_window)].mean())


def first(run_dir: Path, tag: str) -> float:
    return float(curve(run_dir, tag)[1][0])


def last(run_dir: Path, tag: str) -> float:
    return float(curve(run_dir, tag)[1][-1])


def plateau_share(cfg: ReplicationConfig, run_dir: Path) -> float:
    """Share of the contrastive loss's whole decrease done by plateau_at of the steps:
    (L_first - L(plateau_at)) / (L_first - L_final), L(x) the mean of the values logged in (x - final_window, x]
    of the steps, L_final the run's final value."""
    steps, values = curve(run_dir, "align/loss")
    x, w = cfg.plateau_at * steps[-1], cfg.final_window * steps[-1]
    window = (steps > x - w) & (steps <= x)
    at_x = values[window].mean() if window.any() else values[np.searchsorted(steps, x, side="right") - 1]
    total = values[0] - final(cfg, run_dir, "align/loss")
    return float((values[0] - at_x) / total) if total > 0 else float("nan")


@dataclass
class Part:
    """One tested quantity of a claim: per-seed values, their interval, the region and the verdict."""

    measure: str
    region: verdicts.Region
    values: list[float]

    @property
    def interval(self) -> verdicts.Interval:
        return verdicts.t_interval(self.values)

    @property
    def verdict(self) -> str:
        return self.region.verdict(self.interval)


@dataclass
class Claim:
    key: str
    paper: str
    parts: list[Part]

    @property
    def verdict(self) -> str:
        return verdicts.combine([p.verdict for p in self.parts])


def measure(cfg: ReplicationConfig, layout: Layout) -> list[Claim]:
    """Every claim's parts from the completed runs' result.json files (docs/replication.md states each)."""
    d = cfg.margin
    init_seeds, other_seeds = range(cfg.seeds_init), range(cfg.seeds_other)

    def run(group, arm, s):
        return layout.run(group, arm, s)

    def diff(group, a, b, tag, seeds, at=None):
        at = at or (lambda r, t: final(cfg, r, t))
        return [at(run(group, a, s), tag) - at(run(group, b, s), tag) for s in seeds]

    h_lm = last(layout.lm, "probe/heldout_loss")
    forgotten = [(last(run("t2i", "pretrained", s), "probe/heldout_loss") - h_lm)
                 / (last(run("t2i", "random", s), "probe/heldout_loss") - h_lm) for s in init_seeds]
    within, below, above = (lambda b: verdicts.Region("within", b)), (lambda b: verdicts.Region("below", b)), \
        (lambda b: verdicts.Region("above", b))
    return [
        Claim("C1", "Pre-trained and randomly initialised models reach the same loss on text-to-image (Fig. 3).", [
            Part("final total loss, pretrained − random", within(d), diff("t2i", "pretrained", "random", "loss/total", init_seeds))]),
        Claim("C2", "Text-token loss of the pre-trained model starts much lower and the gap vanishes; image-token "
                    "loss is the same throughout (Fig. 4).", [
            Part("first logged text loss, pretrained − random", below(-d),
                 diff("t2i", "pretrained", "random", "loss/text", init_seeds, at=first)),
            Part("final text loss, pretrained − random", within(d), diff("t2i", "pretrained", "random", "loss/text", init_seeds)),
            Part("final image loss, pretrained − random", within(d), diff("t2i", "pretrained", "random", "loss/image", init_seeds))]),
        Claim("C3", "The pre-trained model's language ability collapses after little text-to-image training (Table 1).", [
            Part("share of the LM's held-out English advantage lost: (H_pre − H_LM) / (H_random − H_LM)",
                 above(cfg.forgetting_bound), forgotten)]),
        Claim("C4", "Image tokens only (unconditional): pre-trained = random (Fig. 6).", [
            Part("final image loss, pretrained − random", within(d), diff("uncond", "pretrained", "random", "loss/image", other_seeds))]),
        Claim("C5", "Each of the four partial fine-tunings (1)-(4) ends worse than full fine-tuning (Fig. 6).", [
            Part(f"final image loss, {f} − full", above(d), diff("uncond", f, "pretrained", "loss/image", other_seeds))
            for f in cfg.freezes]),
        Claim("C6", "Contrastive image-text token alignment plateaus quickly, and the aligned init does not beat "
                    "random init (Fig. 7).", [
            Part(f"share of the contrastive loss's decrease done by {cfg.plateau_at:.0%} of the steps",
                 above(cfg.plateau_bound), [plateau_share(cfg, layout.align(s)) for s in other_seeds]),
            Part("final image loss, aligned rows − random rows (both pre-trained)", above(-d),
                 diff("t2i", "aligned", "pretrained", "loss/image", other_seeds))]),
        Claim("Ext", "Mixing corpus text into the batches (data.text_mix_ratio) slows the forgetting of C3.", [
            Part("final held-out English loss, mix − no mix (both pre-trained)", below(-d),
                 [last(run("t2i", "mix", s), "probe/heldout_loss") - last(run("t2i", "pretrained", s), "probe/heldout_loss")
                  for s in other_seeds])]),
    ]


def config_dict(cfg: ReplicationConfig) -> dict:
    return dataclasses.asdict(cfg)
