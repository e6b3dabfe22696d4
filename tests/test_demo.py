"""`make demo` end to end at a tiny scale: data, 2 CPU ranks through the DeepSpeed launcher, samples, score."""

import json

import pytest
from PIL import Image

from t2i_ds.demo.__main__ import main as demo_main


@pytest.mark.slow
def test_demo_pipeline_small(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert demo_main(["--out", str(tmp_path), "--n-train", "300", "--n-val", "16", "--steps", "6", "--grid", "8"]) == 0
    out = capsys.readouterr().out
    assert "color     consistency" in out and "chance 0.125" in out
    score = json.loads((tmp_path / "results.json").read_text())
    assert score["n"] == 16 and 0.0 <= score["color"] <= 1.0
    assert Image.open(tmp_path / "samples.png").size[0] > 8 * 32
    cfg = json.loads((tmp_path / "train" / "config.json").read_text())
    plan = json.loads((tmp_path / "train" / "plan.json").read_text())
    assert plan["world_size"] == 2 and cfg["data"]["caption_dropout"] == 0.1
    assert (tmp_path / "train" / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "train" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert "samples" in acc.Tags()["images"]  # drawn during training every max(1, steps // 4) = 1 steps
    assert [e.step for e in acc.Images("samples")] == [1, 2, 3, 4, 5, 6]
