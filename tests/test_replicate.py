"""The replication's parts: the verdict rule, the NeoX subset tokenizer, the corpus extraction, resumable tasks,
and the claims measured from run results. The whole pipeline (`replicate --quick`) runs through docs/replication.md
in tests/test_docs.py."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from t2i_ds.data.bpe_subset import count_ids, subset_bpe
from t2i_ds.data.tokenizers import DEFAULT_TEXT_TOKENIZER
from t2i_ds.paper import replication, verdicts
from t2i_ds.paper.corpus import HELDOUT_EVERY, html_paragraphs, write_corpus
from t2i_ds.paper.runs import RESULT_FILE, Task, is_complete, read_result, run_tasks

# ---- the rule -------------------------------------------------------------------------------------------------


def test_t_interval_matches_the_formula():
    ci = verdicts.t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.hi - 2.0 == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert ci.lo == pytest.approx(4.0 - ci.hi)
    one = verdicts.t_interval([0.3])
    assert one.n == 1 and math.isnan(one.lo) and math.isnan(one.hi)


def ci(lo: float, hi: float, n: int = 3) -> verdicts.Interval:
    return verdicts.Interval((lo + hi) / 2, lo, hi, n)


@pytest.mark.parametrize("kind, bound, lo, hi, expected", [
    ("within", 0.05, -0.04, 0.03, verdicts.HOLDS),
    ("within", 0.05, -0.06, 0.03, verdicts.INCONCLUSIVE),
    ("within", 0.05, 0.06, 0.20, verdicts.FAILS),
    ("within", 0.05, -0.30, -0.06, verdicts.FAILS),
    ("above", 0.05, 0.06, 0.50, verdicts.HOLDS),
    ("above", 0.05, 0.01, 0.50, verdicts.INCONCLUSIVE),
    ("above", 0.05, -0.20, 0.05, verdicts.FAILS),
    ("below", -0.05, -0.90, -0.06, verdicts.HOLDS),
    ("below", -0.05, -0.90, 0.10, verdicts.INCONCLUSIVE),
    ("below", -0.05, -0.05, 0.10, verdicts.FAILS),
])
def test_region_verdicts(kind, bound, lo, hi, expected):
    assert verdicts.Region(kind, bound).verdict(ci(lo, hi)) == expected


def test_one_seed_is_inconclusive_and_parts_combine():
    assert verdicts.Region("above", 0.0).verdict(verdicts.t_interval([5.0])) == verdicts.INCONCLUSIVE
    H, F, I = verdicts.HOLDS, verdicts.FAILS, verdicts.INCONCLUSIVE
    assert verdicts.combine([H, H]) == H
    assert verdicts.combine([H, I]) == I
    assert verdicts.combine([I, F, H]) == F
    with pytest.raises(ValueError):
        verdicts.Region("within", 0.0)


# ---- the NeoX subset tokenizer --------------------------------------------------------------------------------
SEEN = ["The interpreter prints an error message and a stack trace.", "a red circle at the top left on a white background",
        "Functions return None unless they say otherwise; lists are mutable."]


@pytest.fixture(scope="module")
def neox_and_subset():
    from tokenizers import Tokenizer

    neox = Tokenizer.from_file(str(DEFAULT_TEXT_TOKENIZER))
    subset = subset_bpe(json.loads(DEFAULT_TEXT_TOKENIZER.read_text()), count_ids(neox, SEEN), top=10_000)
    return neox, subset, Tokenizer.from_str(json.dumps(subset.tokenizer_json))


def test_subset_gives_neox_tokens_on_the_text_it_was_built_from(neox_and_subset):
    neox, subset, small = neox_and_subset
    assert 256 < subset.size < 2_000 and small.get_vocab_size() == subset.size
    assert list(subset.old_ids) == sorted(subset.old_ids)
    for text in SEEN:
        theirs = neox.encode(text, add_special_tokens=False).ids
        ours = small.encode(text, add_special_tokens=False).ids
        assert [int(subset.old_ids[i]) for i in ours] == theirs


def test_subset_encodes_unseen_text_losslessly(neox_and_subset):
    neox, _, small = neox_and_subset
    text = "Quantum chromodynamics — naïve café, 日本語 and emoji 🎉 survive."
    ids = small.encode(text, add_special_tokens=False).ids
    assert small.decode(ids) == text
    assert len(ids) > len(neox.encode(text, add_special_tokens=False).ids)  # rarer words: more, shorter pieces


def test_subset_keeps_required_ids_and_refuses_unknown_ones():
    neox_json = json.loads(DEFAULT_TEXT_TOKENIZER.read_text())
    sub = subset_bpe(neox_json, Counter({500: 3}), top=1, required=[0, 12345])
    assert {0, 500, 12345} <= set(sub.old_ids.tolist())
    with pytest.raises(ValueError, match="not in the tokenizer"):
        subset_bpe(neox_json, Counter(), top=1, required=[10**7])


# ---- the corpus ----------------------------------------------------------------------------------------------
def test_html_paragraphs_keep_running_prose_only():
    page = ("<html><body><h1>Title words that are not a paragraph at all</h1>"
            "<p>The <code>len()</code> function returns the number of items of a container object.</p>"
            "<p>Too short.</p><pre>for i in range(3): print(i)  # code is not prose at all here</pre>"
            "<p>Spaces\n   and  &amp; entities are   collapsed into one single space here.</p></body></html>")
    assert html_paragraphs(page) == ["The len() function returns the number of items of a container object.",
                                     "Spaces and & entities are collapsed into one single space here."]


def test_write_corpus_holds_out_every_nth_paragraph(tmp_path):
    paras = [f"paragraph number {i}" for i in range(2 * HELDOUT_EVERY)]
    corpus = write_corpus(paras, tmp_path)
    held = corpus.heldout.read_text().splitlines()
    assert held == [paras[HELDOUT_EVERY - 1], paras[2 * HELDOUT_EVERY - 1]]
    assert len(corpus.train.read_text().splitlines()) == len(paras) - 2


# ---- resumable tasks -----------------------------------------------------------------------------------------
def test_run_tasks_skips_complete_and_redoes_interrupted(tmp_path):
    calls = []

    def work(name):
        def run(d: Path):
            calls.append(name)
            (d / "out.txt").write_text(name)
            return {"name": name}
        return run

    tasks = [Task(n, tmp_path / n, work(n)) for n in ("a", "b")]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stale.txt").write_text("an interrupted attempt")
    lines = []
    run_tasks(tasks, log=lines.append)
    assert calls == ["a", "b"] and not (tmp_path / "b" / "stale.txt").exists()
    assert read_result(tmp_path / "a")["info"] == {"name": "a"}
    run_tasks(tasks, log=lines.append)
    assert calls == ["a", "b"] and sum("complete, skipped" in line for line in lines) == 2


def test_a_failed_task_is_not_complete(tmp_path):
    def boom(d: Path):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_tasks([Task("x", tmp_path / "x", boom)], log=lambda s: None)
    assert not is_complete(tmp_path / "x")


# ---- the plan and the claims ---------------------------------------------------------------------------------
def test_plan_orders_every_run_after_what_it_reads(tmp_path):
    cfg = replication.ReplicationConfig(seeds_init=3, seeds_other=2)
    names = [t.name for t in replication.plan(cfg, replication.Layout(tmp_path), lambda: [])]
    assert names[:2] == ["prepare", "lm"] and len(names) == 2 + 3 * 2 + 2 * (1 + 6 + 2)
    for s in range(2):
        assert names.index(f"align/s{s}") < names.index(f"t2i/aligned/s{s}")
    assert {f"uncond/{f}/s1" for f in replication.FREEZES} <= set(names)


def test_arm_overrides(tmp_path):
    layout = replication.Layout(tmp_path)
    (layout.data).mkdir(parents=True)
    (layout.data / "demo_vocab.json").write_text(json.dumps({"seq_len": 90}))
    cfg = replication.full()
    uncond = replication.arm_overrides(cfg, layout, "uncond", "embed_output_norms_ffn", 1)
    assert {"data.mode=unconditional", "train.freeze=embed_output_norms_ffn", "init.mode=pretrained", "train.seed=1",
            f"train.tokens_per_step={cfg.seqs_per_step * 90}", f"train.steps={cfg.uncond_steps}"} <= set(uncond)
    random = replication.arm_overrides(cfg, layout, "t2i", "random", 0)
    assert not any(s.startswith("init.") and s != "init.seed=0" for s in random)
    assert f"train.probe_every={cfg.t2i_steps // cfg.probes}" in random
    mix = replication.arm_overrides(cfg, layout, "t2i", "mix", 0)
    assert f"data.text_mix_ratio={cfg.text_mix_ratio}" in mix


def _write(run_dir: Path, curves: dict[str, list[float]]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    res = {tag: {"steps": [10.0 * (i + 1) for i in range(len(v))], "values": v} for tag, v in curves.items()}
    (run_dir / RESULT_FILE).write_text(json.dumps({"info": {}, "curves": res, "seconds": 1.0, "load_avg_5min": 1.0}))


def test_measure_reads_the_claimed_quantities(tmp_path):
    cfg = replication.ReplicationConfig(seeds_init=2, seeds_other=2)  # final: the values of the last 10% of steps
    layout = replication.Layout(tmp_path)
    _write(layout.lm, {"probe/heldout_loss": [3.0]})
    for s in range(2):
        # pretrained: text starts 2 nats lower, ends equal; image 0.01 apart; forgets 80% of its 2-nat advantage
        _write(layout.run("t2i", "pretrained", s), {"loss/total": [5, 4, 3, 3], "loss/text": [2, 1, 1, 1],
                                                   "loss/image": [6, 5, 4, 4.01], "probe/heldout_loss": [4.6]})
        _write(layout.run("t2i", "random", s), {"loss/total": [6, 4, 3, 3], "loss/text": [4, 2, 1, 1],
                                               "loss/image": [6, 5, 4, 4.0], "probe/heldout_loss": [5.0]})
        _write(layout.run("t2i", "mix", s), {"probe/heldout_loss": [3.5 + 0.1 * s]})
        _write(layout.run("t2i", "aligned", s), {"loss/image": [6, 5, 4, 4.0 + 0.02 * s]})
        for arm, end in (("pretrained", 3.0), ("random", 3.0), *((f, 3.5 + 0.01 * s) for f in replication.FREEZES)):
            _write(layout.run("uncond", arm, s), {"loss/image": [5, 4, 3.2, end]})
        _write(layout.align(s), {"align/loss": [5.0, 3.0, 2.1, 2.05, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]})
    claims = {c.key: c for c in replication.measure(cfg, layout)}
    values = {c.key: [p.values for p in c.parts] for c in claims.values()}
    assert values["C1"] == [[0.0, 0.0]]
    assert values["C2"][0] == [-2.0, -2.0] and values["C2"][2] == pytest.approx([0.01, 0.01])
    assert values["C3"] == [pytest.approx([0.8, 0.8])]
    assert values["Ext"] == [pytest.approx([-1.1, -1.0])]
    assert values["C5"][0] == pytest.approx([0.5, 0.51])
    assert values["C6"][0] == pytest.approx([2 / 3, 2 / 3])  # by step 20 of 100: 5 -> 3 of the whole 5 -> 2
    assert values["C6"][1] == pytest.approx([-0.01, 0.01])
    assert {k: c.verdict for k, c in claims.items()} == {
        "C1": verdicts.HOLDS, "C2": verdicts.HOLDS, "C3": verdicts.HOLDS, "C4": verdicts.HOLDS, "C5": verdicts.HOLDS,
        "C6": verdicts.FAILS,  # (a) 2/3 < 0.8 on both seeds; (b) [-0.13, 0.13] straddles -δ
        "Ext": verdicts.HOLDS,
    }
    assert claims["C6"].parts[1].verdict == verdicts.INCONCLUSIVE


def test_probes_read_the_configured_heldout_text(tmp_path):
    """train.probe_heldout: the probes' held-out loss reads that file instead of the shipped asset."""
    import torch

    from t2i_ds.config import apply_overrides, preset
    from t2i_ds.data.tokenizers import TextTokenizer
    from t2i_ds.trainer.probes import TextProbes
    from t2i_ds.trainer.trainer import Trainer

    text = "Lists are mutable sequences, typically used to store collections of homogeneous items.\n"
    (tmp_path / "heldout.txt").write_text(text)
    cfg = apply_overrides(preset("paper_synthetic"), ["train.probe_every=1", f"train.probe_heldout={tmp_path / 'heldout.txt'}"])
    trainer = Trainer.__new__(Trainer)  # only the probe factory: no engine, no process group
    trainer.cfg, trainer.vocab = cfg, cfg.vocab.build()
    inputs, _ = trainer._make_probes().heldout
    expected, _ = TextProbes(TextTokenizer(None), trainer.vocab, heldout_text=text).heldout
    assert torch.equal(inputs, expected) and len(inputs) == 1
