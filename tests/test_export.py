"""Export: a ZeRO-3 checkpoint becomes an open_lm checkpoint equal to what DeepSpeed's own converter gives, or a
transformers directory of the same tensors."""

import json
import os
import subprocess
import sys

import pytest
import torch

from t2i_ds.export import main as export_main, output_format
from t2i_ds.model.checkpoint import read_state_dict
from tests.trainer_utils import DEBUG_STEPS, env


def deepspeed_fp32(run, out_dir) -> dict[str, torch.Tensor]:
    """The weights as DeepSpeed's `zero_to_fp32.py` (the copy it writes beside the checkpoints) consolidates them."""
    ckpts = run / "checkpoints"
    cmd = [sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(out_dir), "--tag", f"step_{DEBUG_STEPS:08d}",
           "--safe_serialization"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    return load_file(out_dir / "model.safetensors")


@pytest.mark.slow
def test_stage0_checkpoint_exports_its_trained_weights(debug_run, tmp_path):
    """A stage-0 checkpoint has no ZeRO partitions: export reads the module's fp32 weights. They are the weights the
    same 6 steps give under ZeRO-3 on 2 ranks (the same math, its fp64-normed clip: a few ulps apart per step)."""
    single, zero3 = debug_run("single"), debug_run("zero3_x2")
    assert json.loads((single / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0
    assert not list((single / "checkpoints").rglob("*optim_states.pt"))
    for run, name in ((single, "s0"), (zero3, "z3")):
        assert export_main(["--run-dir", str(run), "--out", str(tmp_path / f"{name}.safetensors")]) == 0
    got, ref = read_state_dict(tmp_path / "s0.safetensors"), read_state_dict(tmp_path / "z3.safetensors")
    from t2i_ds.config import preset
    from t2i_ds.trainer.parallelize import build_initialised_model

    cfg = preset("debug")
    init = build_initialised_model(cfg, cfg.vocab.build()).state_dict()
    assert set(got) == set(ref)
    for k in ref:
        moved = (ref[k] - init[k]).abs().max().item()
        print(k, (got[k] - ref[k]).abs().max().item(), moved)
        assert got[k].dtype == torch.float32 and torch.allclose(got[k], ref[k], rtol=0, atol=1e-5), k
        assert moved == 0 or moved > 100 * 1e-5, k  # training moved it well past the tolerance (or it is a buffer)


@pytest.mark.slow
def test_zero3_checkpoint_exports_what_zero_to_fp32_gives(debug_run, tmp_path):
    run = debug_run("zero3_x2")  # 2 ranks, ZeRO-3: every weight is partitioned across the ranks
    ref = deepspeed_fp32(run, tmp_path / "ref")
    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "m.safetensors")]) == 0
    sd = read_state_dict(tmp_path / "m.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file
    assert set(sd) == set(ref) and len(ref) == 22  # 2 layers x (8 weights + rotary buffer), embeddings, norm, output
    for k in ref:
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], ref[k]), k
    assert sd["tok_embeddings.weight"].shape == (370, 64)  # the debug preset's tiny vocabulary, every row
    # the trained weights, not the initial ones
    from t2i_ds.config import preset
    from t2i_ds.trainer.parallelize import build_initialised_model

    cfg = preset("debug")
    init = build_initialised_model(cfg, cfg.vocab.build())
    assert not torch.equal(init.output.weight, sd["output.weight"])

    # a directory: the transformers checkpoint, the same tensors under StableLm's names
    import transformers

    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    w = dict(hf.named_parameters())
    assert type(hf).__name__ == "StableLmForCausalLM" and torch.equal(w["lm_head.weight"], ref["output.weight"])
    assert torch.equal(w["model.layers.1.mlp.gate_proj.weight"], ref["layers.1.feed_forward.w12.weight"][:256])
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode("a cat") == [66, 5798]  # NeoX

    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "hf_text"), "--text-rows-only"]) == 0
    text_cfg = json.loads((tmp_path / "hf_text" / "config.json").read_text())
    assert text_cfg["vocab_size"] == 300 and "vocab" not in text_cfg["t2i_ds"]  # a text LM: no image vocabulary
    assert torch.equal(read_state_dict(tmp_path / "hf_text")["output.weight"], ref["output.weight"][:300])

    assert export_main(["--run-dir", str(run), "--out", str(tmp_path / "t.pt"), "--text-rows-only"]) == 0
    text = read_state_dict(tmp_path / "t.pt")
    for k in ("tok_embeddings.weight", "output.weight"):
        assert torch.equal(text[k], ref[k][:300]), k  # the 300 text rows, nothing else


@pytest.mark.slow
def test_run_files_are_readable_like_any_file(debug_run):
    """Our files (atomic writes: COMPLETE, rank states, exports) and DeepSpeed's honour the umask alike."""
    run = debug_run("zero3_x2")
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in run.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"COMPLETE", "rank_00000.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "config.json"} <= names
    bad = {str(p.relative_to(run)): oct(p.stat().st_mode & 0o777) for p in files
           if p.stat().st_mode & 0o666 != 0o666 & ~umask}
    assert bad == {}


def test_format_follows_the_output_name():
    assert output_format("m.safetensors", "auto") == "open_lm" and output_format("m.pt", "auto") == "open_lm"
    assert output_format("out/hf_model", "auto") == "hf" and output_format("out/hf_model", "hf") == "hf"
    with pytest.raises(ValueError, match="writes a directory"):
        output_format("m.safetensors", "hf")
    with pytest.raises(ValueError, match="writes a file"):
        output_format("out/dir", "open_lm")


def test_missing_run_is_a_clear_error(tmp_path, capsys):
    assert export_main(["--run-dir", str(tmp_path), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not a t2i_ds run directory" in capsys.readouterr().err
