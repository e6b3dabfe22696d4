"""`python -m t2i_ds.paper.replicate`: every claim of the paper re-tested in miniature on a CPU, with a verdict each.

    python -m t2i_ds.paper.replicate --out runs/replicate            # the full run (docs/replication.md)
    python -m t2i_ds.paper.replicate --out runs/replicate_quick --quick

Pre-trains a small open_lm-shaped LM on English (the Python documentation's prose, Debian's python3.11-doc,
t2i_ds.paper.corpus) in a NeoX subset tokenizer (t2i_ds.data.bpe_subset), captions the demo's shapes in it, then
runs C1-C6 and the text-mixing extension over seeds with the real trainer (t2i_ds.paper.replication lists
the runs) and writes OUT/report.md and OUT/figures/: per claim the paper's statement, the measured effect with
its 95% interval over seeds and the verdict by the rule stated in docs/replication.md (t2i_ds.paper.verdicts).
Resumable: a run of the sequence that finished is skipped on the next invocation; an interrupted one is redone.
`--quick` runs the same pipeline tiny on the corpus excerpt shipped in t2i_ds/assets (a test; no verdicts).
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from t2i_ds.cli import positive_int
from t2i_ds.paper.corpus import DEBIAN_HTML


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="t2i_ds.paper.replicate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/replicate", help="output directory (runs, report.md, figures/)")
    p.add_argument("--quick", action="store_true", help="the whole pipeline tiny, on the shipped corpus excerpt")
    p.add_argument("--threads", type=positive_int, default=1, help="intra-op threads of every run (torch)")
    p.add_argument("--corpus-html", default=str(DEBIAN_HTML), help="HTML of the Python documentation (python3.11-doc)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from t2i_ds.paper import corpus, replication
    from t2i_ds.paper.report import write_report
    from t2i_ds.paper.runs import run_tasks, task_seconds
    from t2i_ds.provenance import git_revision

    args = parse_args(argv)
    _cpu_accelerator_without_gpu()
    _threads(args.threads)
    start, commit = time.monotonic(), git_revision()  # the code that runs: HEAD may move while it does
    cfg = replication.quick() if args.quick else replication.full()
    layout = replication.Layout(Path(args.out).resolve())
    paragraphs = corpus.excerpt_paragraphs if args.quick else (lambda: corpus.debian_paragraphs(Path(args.corpus_html)))
    tasks = replication.plan(cfg, layout, paragraphs)
    run_tasks(tasks, prefix="[replicate]")
    claims = replication.measure(cfg, layout)
    seconds, load = task_seconds(tasks)
    facts = {"mode": "quick (a test of the pipeline, not of the claims)" if args.quick else "full",
             "commit": commit, "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
             "wall time of the tasks": f"{seconds / 60:.1f} min", "mean 5-min load average": f"{load:.2f}",
             "this invocation": f"{(time.monotonic() - start) / 60:.1f} min", "CPU cores": os.cpu_count()}
    report = write_report(cfg, layout, claims, facts)
    print(f"[replicate] wrote {report}")
    for c in claims:
        print(f"  {c.key:4s} {c.verdict}")
    return 0


def _threads(n: int) -> None:
    """Intra-op threads of every run. One by default: the miniature's matmuls are too small for a second thread to
    pay, and on a busy machine two threads stall each other at every parallel region (the quick pipeline took
    over 600 s with two, 45 s with one, at a load average of 12 on 2 cores)."""
    import torch

    torch.set_num_threads(n)


def _cpu_accelerator_without_gpu() -> None:
    """DeepSpeed's CPU accelerator when there is no GPU (read when DeepSpeed is first imported, in the first run)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


if __name__ == "__main__":
    from t2i_ds.cli import run

    run("t2i_ds.paper.replicate", main)
