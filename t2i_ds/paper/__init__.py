"""The paper's analyses as commands: `python -m t2i_ds.paper.align` (contrastive alignment, library in alignment.py),
`python -m t2i_ds.paper.figures` (figures 3, 4, 6, 7 from TensorBoard runs, library in curves.py),
`python -m t2i_ds.paper.compare_init` (pre-trained vs random init on the demo data), `python -m t2i_ds.paper.replicate`
(every claim in miniature with verdicts; library in corpus.py, replication.py, runs.py, verdicts.py, report.py). Nothing outside paper/ imports it."""
