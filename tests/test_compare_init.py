"""The pre-trained vs random comparison end to end on demo data: per-modality losses and the figures."""

import json

import numpy as np
import pytest
from PIL import Image

from t2i_ds.paper.compare_init import main as compare_main


@pytest.mark.slow
def test_compare_pretrained_vs_random(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert compare_main(["--out", str(tmp_path), "--n-train", "400", "--text-steps", "40", "--steps", "4", "--log-every", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    # the text LM's rows were loaded: text loss starts far lower than from random init (paper Fig. 4)
    assert summary["pretrained"]["loss/text"][0] < summary["random"]["loss/text"][0] - 0.5
    for name in ("t2i_pretrained", "t2i_random"):
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["init"]["mode"] == name.split("_")[1]
    for fig in ("fig3", "fig4"):
        png = next((tmp_path / "figures").glob(f"{fig}*.png"))
        img = np.asarray(Image.open(png).convert("L"))
        assert img.shape[0] > 100 and img.std() > 5  # a drawn plot, not a blank canvas
