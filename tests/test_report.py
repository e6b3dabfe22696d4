"""The one-page run report (t2i_ds.eval.report) and its command, on a small hand-made run directory."""

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from t2i_ds.eval.__main__ import main as eval_main
from t2i_ds.eval.report import write_report

CAPTIONS = ["a red circle at the top left on a white background", "center: blue cross", "green square, bottom right"]


@pytest.fixture
def run(tmp_path):
    """run/ (config, metrics of 3 log steps, command), samples/ (3 PNGs), captions.jsonl, judge.json."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"steps": 30}, "vocab": {"image_size": 64}}))
    (run / "command.txt").write_text("t2i_ds/train.py --preset demo\n")
    rows = [{"step": s, "loss/total": 3.0 / s, "loss/image": 2.5 / s, "loss/text": 4.0 / s, "ppl/total": 20.0 / s,
             "ppl/image": 12.0 / s, "ppl/text": 50.0 / s, "perf/tokens_per_s": 1000.0 + s} for s in (10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = tmp_path / "samples"
    samples.mkdir()
    rng = np.random.default_rng(0)
    for i in range(len(CAPTIONS)):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(samples / f"{i:06d}.png")
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS))
    verdicts = [{"color": True, "shape": i != 1, "all": i != 1} for i in range(len(CAPTIONS))]
    table = {"real": {"color": 1.0, "shape": 0.99}, "generated": {"color": 0.9, "shape": 0.667}}
    (tmp_path / "judge.json").write_text(json.dumps({"table": table, "verdicts": verdicts, "n": 3}))
    return tmp_path


def embedded_images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def assert_self_contained(page: str) -> None:
    """Nothing a browser would fetch: every src/href is a data: URI, no URL anywhere else, no script or link tag."""
    assert all(v.startswith("data:") for v in re.findall(r'(?:src|href)="([^"]*)"', page))
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert "://" not in text and "url(" not in text and not re.search(r"<(script|link|iframe|object)\b", text)


def test_report_names_every_caption_embeds_every_image_and_links_nothing(run):
    page = write_report(run / "run", run / "report.html", samples=run / "samples", captions=run / "captions.jsonl",
                        judge=run / "judge.json").read_text()
    for caption in CAPTIONS:
        assert caption in page
    embedded = embedded_images(page)
    for i in range(len(CAPTIONS)):
        assert (run / "samples" / f"{i:06d}.png").read_bytes() in embedded
    assert len(embedded) == len(CAPTIONS) + 1  # the samples and the loss / perplexity plot
    assert Image.open(__import__("io").BytesIO(embedded[-1])).size[0] > 400  # a real plot, not an empty image
    assert_self_contained(page)
    assert '<span class="bad">shape ✗</span>' in page and page.count('<span class="ok">shape ✓</span>') == 2  # per image
    assert "0.667" in page and "real" in page  # the score table
    assert "tensorboard --logdir" in page and "t2i_ds/train.py --preset demo" in page
    assert '"steps": 30' in page  # the resolved config


def test_report_of_a_run_alone(run, capsys):
    """No samples, captions or judge: the training half of the page, written by the command."""
    assert eval_main(["report", "--run-dir", str(run / "run")]) == 0
    page = (run / "run" / "report.html").read_text()
    assert str(run / "run" / "report.html") in capsys.readouterr().out
    assert len(embedded_images(page)) == 1 and "Scores" not in page and "Samples" not in page
    assert "<td>1,020</td>" in page  # median tokens/s of the three windows


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a t2i_ds run directory"):
        write_report(tmp_path, tmp_path / "report.html")
