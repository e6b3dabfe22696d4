"""The paper's figures from TensorBoard event files (matplotlib, Agg backend).

    fig3  perplexity (ppl/total) vs training tokens                       (paper Figure 3)
    fig4  text and image loss (loss/text, loss/image) vs training tokens  (paper Figure 4)
    fig6  image loss (loss/image) of unconditional / freezing runs        (paper Figure 6)
    fig7  alignment loss and temperature (align/loss, align/temperature)  (paper Figure 7)
    forgetting  held-out English loss of the text probes (probe/heldout_loss)   (paper Table 1, as a curve)

Every figure draws each run that has its tags: the faint line is the raw curve, the solid one its
EMA (paper Fig. 6 uses 0.95). The x axis is `tokens/seen` read at the same steps (or the step).
A figure none of whose runs has its tags is skipped with a warning line.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

TOKENS_TAG = "tokens/seen"
DPI = 100
PANEL_SIZE = (6.4, 4.0)  # inches per panel: 640 x 400 px at DPI


@dataclass
class Curve:
    steps: np.ndarray  # (n,) int
    values: np.ndarray  # (n,) float


Run = dict[str, Curve]  # tag -> curve


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    panels: tuple[tuple[str, str], ...]  # (tag, y label) per panel
    layout: tuple[int, int]  # (rows, cols)
    log_y: bool = False
    x_is_step: bool = False  # alignment runs have no token count


FIGURES = {
    "fig3": Figure("fig3", "Perplexity during training", (("ppl/total", "perplexity"),), (1, 1), log_y=True),
    "fig4": Figure("fig4", "Loss on text and image tokens", (("loss/text", "text loss"), ("loss/image", "image loss")), (1, 2)),
    "fig6": Figure("fig6", "Image-token loss", (("loss/image", "image loss"),), (1, 1)),
    "fig7": Figure(
        "fig7", "Image-text token contrastive alignment",
        (("align/loss", "contrastive loss"), ("align/temperature", "temperature")), (2, 1), x_is_step=True,
    ),
    "forgetting": Figure("forgetting", "Held-out English loss (forgetting probes)",
                         (("probe/heldout_loss", "held-out text loss"),), (1, 1)),
}


def ema(values: np.ndarray, alpha: float) -> np.ndarray:
    """Debiased EMA, as TensorBoard's smoothing slider and pandas' `ewm(alpha=1 - alpha)`:

        m_t = alpha * m_{t-1} + (1 - alpha) * v_t,  m_{-1} = 0;   s_t = m_t / (1 - alpha^(t+1))

    The division removes the pull towards 0 of the zero start. alpha = 0 returns the values.
    """
    out = np.empty(len(values), dtype=np.float64)
    m = 0.0
    for t, v in enumerate(values):
        m = alpha * m + (1 - alpha) * float(v)
        out[t] = m / (1 - alpha ** (t + 1))
    return out


def event_dirs(run_dir: str | Path) -> list[str]:
    """Directories under run_dir (itself included) that hold TensorBoard event files."""
    files = glob.glob(os.path.join(glob.escape(str(run_dir)), "**", "events.out.tfevents.*"), recursive=True)
    return sorted({os.path.dirname(f) for f in files})


def load_curves(run_dir: str | Path) -> Run:
    """Every scalar tag of a run directory; resumed runs (repeated steps) keep the latest value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dirs = event_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"no TensorBoard event files under {run_dir}")
    points: dict[str, dict[int, tuple[float, float]]] = {}
    for d in dirs:
        acc = EventAccumulator(d, size_guidance={"scalars": 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                old = points.setdefault(tag, {}).get(e.step)
                if old is None or e.wall_time >= old[0]:
                    points[tag][e.step] = (e.wall_time, e.value)
    return {tag: _curve(p) for tag, p in points.items()}


def load_texts(run_dir: str | Path) -> dict[str, str]:
    """The last logged value of every text summary of a run (tag -> markdown text), e.g. probe completions."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    latest: dict[str, tuple[int, str]] = {}
    for d in event_dirs(run_dir):
        acc = EventAccumulator(d, size_guidance={"tensors": 0})
        acc.Reload()
        for tag in acc.Tags()["tensors"]:
            for e in acc.Tensors(tag):
                name = tag.removesuffix("/text_summary")
                if e.tensor_proto.string_val and e.step >= latest.get(name, (-1, ""))[0]:
                    latest[name] = (e.step, e.tensor_proto.string_val[0].decode("utf-8"))
    return {tag: text for tag, (_, text) in latest.items()}


def _curve(points: dict[int, tuple[float, float]]) -> Curve:
    steps = np.array(sorted(points), dtype=np.int64)
    return Curve(steps, np.array([points[s][1] for s in steps], dtype=np.float64))


def x_values(run: Run, curve: Curve, x: str) -> np.ndarray:
    """Steps, or tokens seen at those steps (interpolated between logged points)."""
    if x == "step" or TOKENS_TAG not in run:
        return curve.steps.astype(np.float64)
    tokens = run[TOKENS_TAG]
    return np.interp(curve.steps, tokens.steps, tokens.values)


def draw(fig_spec: Figure, runs: dict[str, Run], out_dir: Path, alpha: float, x: str, warn: Callable[[str], None]) -> Path | None:
    """One PNG; None (and a warning) when no run has the figure's tags."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tags = [tag for tag, _ in fig_spec.panels]
    have = {name: run for name, run in runs.items() if all(t in run for t in tags)}
    if not have:
        warn(f"figures: skipping {fig_spec.name}: no run has {', '.join(tags)}")
        return None
    for name in sorted(set(runs) - set(have)):
        warn(f"figures: {fig_spec.name}: run {name!r} lacks {', '.join(t for t in tags if t not in runs[name])}")
    x = "step" if fig_spec.x_is_step else x
    for name, run in have.items():
        if x == "tokens" and TOKENS_TAG not in run:
            warn(f"figures: {fig_spec.name}: run {name!r} has no {TOKENS_TAG}; its x axis is the step")
    rows, cols = fig_spec.layout
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), dpi=DPI, squeeze=False)
    for ax, (tag, label) in zip(axes.flat, fig_spec.panels):
        _panel(ax, have, tag, label, alpha, x, fig_spec.log_y)
    fig.suptitle(fig_spec.title + (f" (EMA {alpha})" if alpha else ""))
    fig.tight_layout()
    path = out_dir / f"{fig_spec.name}.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _panel(ax, runs: dict[str, Run], tag: str, label: str, alpha: float, x: str, log_y: bool) -> None:
    for i, (name, run) in enumerate(runs.items()):
        curve, color = run[tag], f"C{i % 10}"
        xs = x_values(run, curve, x)
        if alpha:
            ax.plot(xs, curve.values, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(xs, ema(curve.values, alpha), color=color, label=name, linewidth=1.5)
    ax.set_xlabel("training tokens" if x == "tokens" else "step")
    ax.set_ylabel(label)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()


def make_figures(
    runs: dict[str, Run], out_dir: str | Path, names=tuple(FIGURES), alpha: float = 0.95, x: str = "tokens", warn=print
) -> list[Path]:
    """Draw the named figures for `runs` (name -> loaded run) into out_dir; returns the PNG paths."""
    if not runs:
        raise ValueError("no runs given: pass at least one NAME=RUN_DIR")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"EMA alpha must be in [0, 1), got {alpha}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [draw(FIGURES[n], runs, out_dir, alpha, x, warn) for n in names]
    return [p for p in paths if p is not None]
