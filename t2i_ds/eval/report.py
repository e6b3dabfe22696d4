"""One self-contained HTML page for a training run: what it drew, how well, how it trained, how to get it again.

`write_report(run_dir, out, ...)` reads what a run directory holds and writes `out` (one file: images and
plots embedded as data: URIs, no script, no network):

    samples      {index:06d}.png from a folder, each with caption `index` of a captions file (.txt / .jsonl)
                 and, where a judge file gives one, its per-attribute verdict (✓ / ✗) under the image
    judge        a JSON file (the demo's results.json): `table` {row: {attribute: fraction}} (real /
                 tokenizer / generated / chance) and `verdicts`, one {attribute: bool} per caption index
    training     loss and perplexity per modality over steps (run_dir/metrics.jsonl, the same numbers as
                 TensorBoard), throughput, the run's resolved config (config.json) and git revision
    commands     how to reproduce the run and open its TensorBoard logs

Every section but training is optional, so the page works for a run of any size.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from t2i_ds.eval.generation import image_name, read_caption_file

LOSS_KEYS = ("total", "text", "image", "special")  # loss/<k> and ppl/<k> of trainer.metrics.loss_metrics
MARK = {True: "✓", False: "✗"}


@dataclass
class Judge:
    """The judge file: the score table and one verdict per caption index."""

    table: dict[str, dict[str, float]]
    verdicts: list[dict[str, bool]] = field(default_factory=list)
    n: int | None = None  # captions the table was scored on
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase of the run, where recorded

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Judge":
        data = json.loads(Path(path).read_text())
        if "table" not in data:
            raise ValueError(f"{path}: a judge file needs a 'table' ({{row: {{attribute: fraction}}}})")
        return cls(data["table"], data.get("verdicts", []), data.get("n"), data.get("seconds", {}))


def _text(s: str) -> str:
    """Element content, escaped (quotes are kept: the page puts no text inside attributes)."""
    return html.escape(s, quote=False)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, float]]:
    """run_dir/metrics.jsonl, one dict per logged step (empty when the run logged nothing yet)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def curves_png(metrics: Sequence[dict[str, float]]) -> bytes | None:
    """Loss and perplexity per modality over steps, two panels side by side, as PNG bytes (None: nothing logged)."""
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display; a file only
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), dpi=80)
    for ax, prefix in zip(axes, ("loss", "ppl")):
        for key in LOSS_KEYS:
            rows = [m for m in metrics if f"{prefix}/{key}" in m]
            if rows:
                ax.plot([m["step"] for m in rows], [m[f"{prefix}/{key}"] for m in rows], label=key, marker=".")
        ax.set(xlabel="step", title=f"{prefix} per target modality", yscale="log" if prefix == "ppl" else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def throughput(metrics: Sequence[dict[str, float]]) -> dict[str, float]:
    """Median over the logged windows of tokens/s (all ranks) and per device, and the last step logged."""
    if not metrics:
        return {}
    out = {"steps logged": metrics[-1]["step"]}
    for key in ("perf/tokens_per_s", "perf/tokens_per_s_per_device", "perf/tflops_per_device", "perf/mfu"):
        values = [m[key] for m in metrics if key in m]
        if values:
            out[key] = statistics.median(values)
    return out


def _number(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_text(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_text(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def judge_section(judge: Judge) -> str:
    columns = list(next(iter(judge.table.values())))
    rows = [[row] + [f"{scores[c]:.3f}" for c in columns] for row, scores in judge.table.items()]
    n = f" on {judge.n} held-out captions" if judge.n else ""
    timing = _table(["phase", "seconds"], [[k, f"{v:.0f}"] for k, v in judge.seconds.items()]) if judge.seconds else ""
    return f"<h2>Scores{n}</h2>" + _table(["images"] + columns, rows) + timing


def samples_section(images: Sequence[Path], captions: Sequence[str], verdicts: Sequence[dict[str, bool]]) -> str:
    """One figure per image: the image (upscaled, pixelated), its caption, its verdict line."""
    figures = []
    for i, path in enumerate(images):
        marks = ""
        if i < len(verdicts):  # one mark per attribute, each coloured: the wrong one stands out
            marks = " ".join(f'<span class="{"ok" if v else "bad"}">{_text(k)} {MARK[v]}</span>'
                             for k, v in verdicts[i].items() if k != "all")
            marks = f'<div class="v">{marks}</div>'
        caption = _text(captions[i]) if i < len(captions) else ""
        figures.append(f'<figure><img src="{data_uri(path.read_bytes())}" alt="sample {i}">'
                       f"<figcaption>{caption}{marks}</figcaption></figure>")
    return f"<h2>Samples ({len(images)})</h2><div class=\"grid\">{''.join(figures)}</div>"


def training_section(run_dir: Path, metrics: Sequence[dict[str, float]]) -> str:
    png = curves_png(metrics)
    plot = f'<img class="plot" src="{data_uri(png)}" alt="loss and perplexity">' if png else "<p>no metrics logged</p>"
    perf = [[k, _number(v)] for k, v in throughput(metrics).items()]
    last = {k: v for k, v in (metrics[-1] if metrics else {}).items() if k.startswith(("loss/", "ppl/"))}
    final = [[k, f"{v:.4f}"] for k, v in last.items()]
    return (f"<h2>Training</h2>{plot}<h3>Throughput (median over log windows)</h3>{_table(['metric', 'value'], perf)}"
            f"<h3>Last logged step</h3>{_table(['metric', 'value'], final)}")


def commands_section(run_dir: Path, commands: Sequence[str]) -> str:
    lines = list(commands)
    recorded = run_dir / "command.txt"
    if recorded.is_file():
        lines.append("# rank 0's training argv, as recorded: " + recorded.read_text().strip())
    lines.append(f"tensorboard --logdir {run_dir / 'tb'}")
    return "<h2>Reproduce</h2><pre>" + _text("\n".join(lines)) + "</pre>"


def config_section(run_dir: Path) -> str:
    parts = []
    for name in ("git_revision.txt", "config.json"):
        path = run_dir / name
        if path.is_file():
            parts.append(f"<h3>{name}</h3><pre>{_text(path.read_text())}</pre>")
    return "<h2>Resolved config</h2>" + "".join(parts)


STYLE = """body{font-family:sans-serif;margin:16px;max-width:1180px}table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px}figure{margin:0;width:136px;font-size:11px}
figure img{width:128px;height:128px;image-rendering:pixelated;border:1px solid #ddd}.ok{color:#070}.bad{color:#c00;font-weight:bold}
.plot{max-width:100%}pre{background:#f6f6f6;padding:6px;font-size:11px;white-space:pre-wrap;max-height:420px;overflow:auto}"""


def render_report(run_dir: str | os.PathLike, *, title: str, images: Sequence[Path] = (), captions: Sequence[str] = (),
                  judge: Judge | None = None, commands: Sequence[str] = ()) -> str:
    """The page as one HTML string (sections in the module docstring's order)."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    body = [f"<h1>{_text(title)}</h1>"]
    if judge:
        body.append(judge_section(judge))
    if images:
        body.append(samples_section(images, captions, judge.verdicts if judge else ()))
    body += [training_section(run_dir, metrics), commands_section(run_dir, commands), config_section(run_dir)]
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{_text(title)}</title>'
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")


def sample_images(folder: str | os.PathLike, n: int | None = None) -> list[Path]:
    """{index:06d}.png of a folder from index 0 up to the first missing one (at most n)."""
    found = []
    while n is None or len(found) < n:
        path = Path(folder) / image_name(len(found))
        if not path.is_file():
            break
        found.append(path)
    return found


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike, *, samples: str | os.PathLike | None = None,
                 captions: str | os.PathLike | None = None, judge: str | os.PathLike | None = None,
                 commands: Sequence[str] = (), title: str | None = None, n: int | None = None) -> Path:
    """Write the report of `run_dir` to `out` (see the module docstring); returns the path written."""
    from t2i_ds.atomic import atomic_write_text

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.json'} does not exist: not a t2i_ds run directory")
    images = sample_images(samples, n) if samples else []
    text = read_caption_file(captions) if captions else []
    page = render_report(run_dir, title=title or f"t2i_ds run {run_dir}", images=images, captions=text,
                         judge=Judge.load(judge) if judge else None, commands=commands)
    atomic_write_text(Path(out), page)
    return Path(out)
