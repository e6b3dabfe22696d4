"""The replication's report: verdict table, the language model (Table 1 analogue), per-seed values, figures.

    write_report(cfg, layout, claims, facts) -> OUT/report.md, figures in OUT/figures/*.png
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from t2i_ds.paper.replication import Claim, Layout, ReplicationConfig, config_dict, last
from t2i_ds.paper.runs import read_result

PROMPT_TAGS = ("probe/relativity", "probe/translation")


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def verdict_table(claims: list[Claim]) -> str:
    rows = ["| claim | the paper says | measured quantity | claimed region | mean [95% interval] (n) | part | claim |",
            "|---|---|---|---|---|---|---|"]
    for c in claims:
        for i, p in enumerate(c.parts):
            head = (f"**{c.key}**", c.paper) if i == 0 else ("", "")
            tail = f"**{c.verdict}**" if i == 0 else ""
            rows.append(f"| {head[0]} | {head[1]} | {p.measure} | {p.region} | {p.interval} | {p.verdict} | {tail} |")
    return "\n".join(rows)


def per_seed_table(claims: list[Claim]) -> str:
    rows = ["| claim | measured quantity | per seed (s0, s1, ...) |", "|---|---|---|"]
    for c in claims:
        for p in c.parts:
            rows.append(f"| {c.key} | {p.measure} | {', '.join(_fmt(v) for v in p.values)} |")
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip() or "(empty)"


def lm_section(cfg: ReplicationConfig, layout: Layout) -> str:
    """Corpus, tokenizer, the LM's held-out loss and its completions before and after text-to-image training."""
    from t2i_ds.paper.curves import load_texts
    from t2i_ds.trainer.probes import paper_prompts

    info = read_result(layout.prepare)["info"]
    h_lm = last(layout.lm, "probe/heldout_loss")
    arms = {"the LM": layout.lm, "after text-to-image (pretrained s0)": layout.run("t2i", "pretrained", 0),
            "after text-to-image with text mixing (mix s0)": layout.run("t2i", "mix", 0),
            "random init after text-to-image (random s0)": layout.run("t2i", "random", 0)}
    heldout = {name: last(d, "probe/heldout_loss") for name, d in arms.items()}
    texts = {name: load_texts(d) for name, d in arms.items()}
    prompts = paper_prompts()
    lines = [
        f"Corpus: {info['paragraphs']:,} paragraphs, {info['train_bytes']:,} bytes of training text, "
        f"{info['heldout_bytes']:,} bytes held out ({info['probe_bytes']:,} of them read by the probes). "
        f"NeoX ids used by the training text: {info['neox_ids_in_corpus']:,}; kept in the subset tokenizer: "
        f"{info['subset_ids']:,} ({info['text_rows']:,} text rows). LM pre-training: {cfg.lm_steps} steps, "
        f"{info['lm_chunks']:,} chunks of {cfg.lm_seq_len - 4} tokens available.",
        "",
        "| model | held-out English loss (nats/token) | perplexity |", "|---|---|---|",
        *(f"| {name} | {h:.3f} | {math.exp(h):.1f} |" for name, h in heldout.items()),
        "",
        f"The LM's held-out perplexity: **{math.exp(h_lm):.1f}**. Greedy completions (the paper's Table 1 prompts; "
        "⏎ is a newline):",
        "",
        "| prompt | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms),
    ]
    for tag in PROMPT_TAGS:
        prompt = prompts[tag.split("/")[1]]
        cells = [_cell(texts[name].get(tag, "")) for name in arms]
        lines.append(f"| {_cell(prompt)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_figures(cfg: ReplicationConfig, layout: Layout, out_dir: Path) -> list[Path]:
    """fig3/fig4 (every seed of C1/C2), forgetting, fig6 (seed 0 of C4/C5), fig7 (every alignment)."""
    from t2i_ds.paper.curves import load_curves, make_figures

    def runs(spec: dict[str, Path]) -> dict:
        return {name: load_curves(d) for name, d in spec.items()}

    s_init, s_other = range(cfg.seeds_init), range(cfg.seeds_other)
    t2i = {f"{arm} s{s}": layout.run("t2i", arm, s) for arm in ("pretrained", "random") for s in s_init}
    forget = {**t2i, **{f"mix s{s}": layout.run("t2i", "mix", s) for s in s_other}}
    uncond = {arm: layout.run("uncond", arm, 0) for arm in ("pretrained", "random", *cfg.freezes)}
    align = {f"align s{s}": layout.align(s) for s in s_other}
    paths = make_figures(runs(t2i), out_dir, ("fig3", "fig4"), alpha=0.0)
    paths += make_figures(runs(forget), out_dir, ("forgetting",), alpha=0.0)
    paths += make_figures(runs(uncond), out_dir, ("fig6",), alpha=0.95)
    paths += make_figures(runs(align), out_dir, ("fig7",), alpha=0.0)
    return paths


def write_report(cfg: ReplicationConfig, layout: Layout, claims: list[Claim], facts: dict) -> Path:
    """OUT/report.md and OUT/figures/; `facts`: commit, wall time, load averages, mode (shown at the top)."""
    figures = draw_figures(cfg, layout, layout.out / "figures")
    parts = [
        "# The paper in miniature: verdicts per claim",
        "",
        " · ".join(f"{k}: {v}" for k, v in facts.items()),
        "",
        "The rule (docs/replication.md): holds when the whole 95% t-interval over seeds lies in the claimed region, "
        "does not hold when it lies entirely outside it, inconclusive otherwise (or with fewer than 2 seeds).",
        "",
        "## Verdicts", "", verdict_table(claims), "",
        "## The language model (Table 1 analogue)", "", lm_section(cfg, layout), "",
        "## Per-seed values", "", per_seed_table(claims), "",
        "## Figures", "", *(f"![{p.stem}](figures/{p.name})" for p in figures), "",
        "## Configuration", "", "```json", json.dumps(config_dict(cfg), indent=2), "```", "",
    ]
    path = layout.out / "report.md"
    path.write_text("\n".join(parts))
    return path
