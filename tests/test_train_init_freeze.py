"""Init modes and freezing presets through the trainer's model builder and the real DeepSpeed engine."""

import json

import pytest
import torch

from t2i_ds.config import apply_overrides, preset
from t2i_ds.model import build_model, model_preset
from t2i_ds.model.checkpoint import save_open_lm
from t2i_ds.trainer.parallelize import build_initialised_model
from tests.trainer_utils import DS_ZERO2, train


@pytest.fixture()
def text_checkpoint(tmp_path):
    """A 'pre-trained' open_lm checkpoint of the debug architecture with the 300 text rows only."""
    torch.manual_seed(123)
    m = build_model(model_preset("debug", vocab_size=300))
    path = tmp_path / "text_lm.pt"
    save_open_lm(m, path)
    return path, m.state_dict()


@pytest.mark.parametrize("new_rows", ["random", "mean"])
def test_pretrained_rows_are_copied_exactly(text_checkpoint, new_rows):
    path, sd = text_checkpoint
    cfg = apply_overrides(preset("debug"), ["init.mode=pretrained", f"init.checkpoint={path}", f"init.new_rows={new_rows}"])
    model = build_initialised_model(cfg, cfg.vocab.build())
    for key in ("tok_embeddings.weight", "output.weight"):
        w = model.state_dict()[key]
        assert w.shape[0] == 370 and torch.equal(w[:300], sd[key])
        if new_rows == "mean":
            assert torch.allclose(w[300:], sd[key].mean(0, keepdim=True).expand(70, -1))
    for key in ("layers.1.feed_forward.w12.weight", "norm.bias"):
        assert torch.equal(model.state_dict()[key], sd[key])


def test_aligned_init_loads(text_checkpoint, tmp_path):
    from t2i_ds.paper.alignment import save_aligned_rows

    path, _ = text_checkpoint
    rows = torch.randn(64, 64)
    save_aligned_rows(tmp_path / "aligned_rows.safetensors", rows, {"note": "test"})
    cfg = apply_overrides(preset("debug"), ["init.mode=pretrained", f"init.checkpoint={path}", "init.new_rows=aligned",
                                            f"init.aligned_rows={tmp_path / 'aligned_rows.safetensors'}"])
    model = build_initialised_model(cfg, cfg.vocab.build())
    assert torch.equal(model.tok_embeddings.weight[300:364], rows)  # image rows come from the alignment


def test_wrong_row_count_is_a_clear_error(text_checkpoint):
    path, _ = text_checkpoint
    from t2i_ds.config import ConfigError

    cfg = apply_overrides(preset("debug"), ["init.mode=pretrained", f"init.checkpoint={path}", "vocab.text_size=320",
                                            "vocab.real_text_size=300"])
    with pytest.raises(ConfigError, match="has 300 embedding rows but vocab.text_size=320"):
        build_initialised_model(cfg, cfg.vocab.build())


@pytest.mark.slow
def test_frozen_parameters_do_not_move_and_have_no_optimizer_state(tmp_path):
    run = tmp_path / "run"
    overrides = ["train.freeze=embed_output_norms", "train.steps=3"]
    train(["--ds_config", DS_ZERO2, "--preset", "debug", *sum((["--set", o] for o in overrides), []),
           "--set", f"train.run_dir={run}"])
    cfg = apply_overrides(preset("debug"), overrides)
    init = build_initialised_model(cfg, cfg.vocab.build())  # same seed -> the run's initial weights
    ckpt = run / "checkpoints" / "step_00000003"
    trained = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    trainable = set(init.freeze_report.trainable_names)
    assert "tok_embeddings.weight" in trainable and "layers.0.attention_norm.bias" in trainable
    assert "layers.0.attention.in_proj.weight" not in trainable
    for name, p in init.named_parameters():
        moved = not torch.equal(trained[name].float(), p.detach())
        assert moved == (name in trainable), name
    optim = torch.load(next(ckpt.glob("*optim_states.pt")), weights_only=False)["optimizer_state_dict"]
    n_state = sum(t.numel() for t in optim["single_partition_of_fp32_groups"])
    assert n_state == init.freeze_report.trainable < init.freeze_report.total
    plan = json.loads((run / "plan.json").read_text())  # the trainer reports what is trainable
    assert plan["trainable_params"] == init.freeze_report.trainable
