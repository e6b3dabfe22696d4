"""Export: a ZeRO checkpoint becomes an open_lm checkpoint equal to the trained weights."""

import pytest
import torch

from t2i_ds.export import main as export_main
from t2i_ds.inference import load_model_for_inference
from t2i_ds.model.checkpoint import read_state_dict
from tests.trainer_utils import DS_ZERO3, train


@pytest.mark.slow
def test_zero3_checkpoint_exports_and_loads(tmp_path):
    run = tmp_path / "run"
    train(["--ds_config", DS_ZERO3, "--preset", "debug", "--set", "train.steps=2", "--set", f"train.run_dir={run}"], ranks=2)
    model, vocab, cfg = load_model_for_inference(run)
    assert vocab.size == model.args.vocab_size == 370
    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    sd = read_state_dict(tmp_path / "m.safetensors")
    for k, v in model.state_dict().items():
        if not k.endswith("inv_freq"):
            assert torch.equal(sd[k], v), k
    # the trained weights differ from the init (the export is not the initial model)
    from t2i_ds.trainer.parallelize import build_initialised_model

    init = build_initialised_model(cfg, vocab)
    assert not torch.equal(init.output.weight, model.output.weight)
    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "t.pt"), "--text-rows-only"]) == 0
    assert read_state_dict(tmp_path / "t.pt")["tok_embeddings.weight"].shape == (300, 64)


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert export_main(["--run-dir", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a t2i_ds run directory" in capsys.readouterr().err
