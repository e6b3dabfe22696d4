"""The transformers checkpoint (t2i_ds.model.hf): from_pretrained opens it with no custom code, its logits and greedy
CFG codes are the project's, and it comes back as an init for `train`."""

import json

import pytest
import torch

from t2i_ds.model import Transformer
from t2i_ds.model.args import ModelArgs
from t2i_ds.model.checkpoint import load_into
from t2i_ds.model.hf import NotExportable, hf_generate_codes, model_args_from_hf, read_hf, save_hf
from t2i_ds.sampling import generate_images
from t2i_ds.vocab import SPECIAL_NAMES, tiny_vocab
from tests.conftest import NEOX_BPE

transformers = pytest.importorskip("transformers")


def tiny(vocab, seed: int = 0, **overrides) -> tuple[Transformer, ModelArgs]:
    """A debug-sized model with every parameter (norms included) away from its init value."""
    torch.manual_seed(seed)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=vocab.size, seq_len=64, loss_impl="torch", **overrides)
    model = Transformer(args, vocab.modality_bounds).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, args


def open_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()


VARIANTS = {
    "rotary": ({}, "StableLmForCausalLM"),
    "head_rotary": ({"pos_embed": "head_rotary"}, "StableLmForCausalLM"),  # the released 1B
    "none": ({"pos_embed": "none"}, "StableLmForCausalLM"),
    "gain_only": ({"norm_type": "gain_only_layer_norm"}, "StableLmForCausalLM"),
    "rms_theta": ({"norm_type": "rms_norm", "rotary_theta": 500.0, "norm_eps": 1e-6}, "LlamaForCausalLM"),
    "tied": ({"weight_tying": True}, "StableLmForCausalLM"),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_equal_the_projects(name, tmp_path):
    overrides, cls = VARIANTS[name]
    vocab = tiny_vocab()
    model, args = tiny(vocab, **overrides)
    save_hf(model.state_dict(), args, tmp_path, vocab)
    hf = open_hf(tmp_path)
    assert type(hf).__name__ == cls
    ids = torch.randint(0, vocab.size, (2, 33), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    err = (ours - theirs).abs().max().item()
    print(f"{name}: max |logits diff| = {err:.2e}")
    assert err <= 1e-5
    # ... and the directory reads back as the same open_lm model, tensor for tensor
    sd, back = read_hf(tmp_path)
    assert back == args
    again = Transformer(back, vocab.modality_bounds, init=False)
    load_into(again, sd)
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k


def test_config_records_the_vocabulary_and_the_files(tmp_path):
    vocab = tiny_vocab()
    model, args = tiny(vocab)
    save_hf(model.state_dict(), args, tmp_path, vocab, text_tokenizer=NEOX_BPE)
    cfg = json.loads((tmp_path / "config.json").read_text())
    t2i = cfg["t2i_ds"]
    assert t2i["vocab"]["image_size"] == vocab.image_size and t2i["image_offset"] == vocab.image_offset
    assert t2i["specials"] == {n: vocab.special(n) for n in SPECIAL_NAMES}
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (vocab.doc, vocab.doc_end, vocab.pad_id)
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 1.0  # StableLm's default (0.25) would be wrong
    from safetensors.torch import load_file

    assert not any(k.endswith("inv_freq") for k in load_file(tmp_path / "model.safetensors"))  # transformers builds its own
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    from tokenizers import Tokenizer

    text = "a red circle above a blue square"
    assert tok(text, add_special_tokens=False)["input_ids"] == Tokenizer.from_file(str(NEOX_BPE)).encode(text).ids


@pytest.mark.parametrize("pos_embed", ["rotary", "head_rotary"])
@pytest.mark.parametrize("mode", ["guidance", "doubled"])
def test_greedy_cfg_codes_identical(pos_embed, mode, tmp_path):
    vocab = tiny_vocab()
    model, args = tiny(vocab, pos_embed=pos_embed)
    save_hf(model.state_dict(), args, tmp_path, vocab)
    captions = [[5, 6, 7], [8], [9, 10, 11, 12, 13], []]  # different lengths: left padding on both sides
    ours = generate_images(model, vocab, captions, cfg_scale=3.0, top_k=1, sample_impl="ref")
    theirs = hf_generate_codes(open_hf(tmp_path), vocab, captions, 3.0, mode)
    assert ours.shape == theirs.shape == (4, vocab.image_tokens)
    assert len(set(ours.flatten().tolist())) > 4  # not a degenerate constant image
    assert torch.equal(ours, theirs)


def test_unrepresentable_options_are_refused(tmp_path):
    vocab = tiny_vocab()
    for overrides, words in (({"qk_norm": True}, "per head"), ({"post_embed_norm": True}, "after the embedding"),
                             ({"norm_type": "rms_norm", "pos_embed": "none"}, "always rotates")):
        model, args = tiny(vocab, **overrides)
        with pytest.raises(NotExportable, match=words):
            save_hf(model.state_dict(), args, tmp_path, vocab)
    with pytest.raises(NotExportable, match="partial_rotary_factor=0.25"):
        model_args_from_hf({"model_type": "stablelm", "hidden_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "vocab_size": 10, "intermediate_size": 256})


def test_transformers_checkpoint_is_an_init_for_train(tmp_path):
    """A StableLm text LM written by transformers itself (save_pretrained) -> init.mode=pretrained, rows extended."""
    from t2i_ds.config import apply_overrides, preset
    from t2i_ds.trainer.parallelize import build_initialised_model

    cfg = preset("debug")
    vocab = cfg.vocab.build()
    hf_cfg = transformers.StableLmConfig(
        vocab_size=vocab.text_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, partial_rotary_factor=1.0, max_position_embeddings=64)
    torch.manual_seed(3)
    text_lm = transformers.StableLmForCausalLM(hf_cfg)
    text_lm.save_pretrained(str(tmp_path / "lm"))
    cfg = apply_overrides(cfg, ["init.mode=pretrained", f"init.checkpoint={tmp_path / 'lm'}"])
    model = build_initialised_model(cfg, vocab)
    w = dict(text_lm.named_parameters())
    assert torch.equal(model.tok_embeddings.weight[: vocab.text_size], w["model.embed_tokens.weight"])
    assert torch.equal(model.output.weight[: vocab.text_size], w["lm_head.weight"])
    assert torch.equal(model.layers[1].attention.in_proj.weight[64:128], w["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(model.layers[0].feed_forward.w12.weight[256:], w["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(model.layers[0].ffn_norm.bias, w["model.layers.0.post_attention_layernorm.bias"])
    # its own forward agrees with transformers' on text ids
    ids = torch.randint(0, vocab.text_size, (1, 20))
    with torch.no_grad():
        assert (model.eval()(ids)[..., : vocab.text_size] - text_lm.eval()(ids).logits).abs().max() <= 1e-5

    # an exported t2i model (every row already trained) is taken as it is
    t2i, args = tiny(vocab)
    save_hf(t2i.state_dict(), args.replace(attn_backend="auto"), tmp_path / "t2i", vocab)
    cfg = apply_overrides(preset("debug"), ["init.mode=pretrained", f"init.checkpoint={tmp_path / 't2i'}"])
    again = build_initialised_model(cfg, vocab)
    assert torch.equal(again.output.weight, t2i.output.weight)


def test_readme_loads_it_in_three_lines(tmp_path, monkeypatch):
    """README's python block that opens the exported directory runs as written (in a directory that has one)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "AutoModelForCausalLM" in b]
    assert len(block.strip().splitlines()) == 3
    vocab = tiny_vocab()
    model, args = tiny(vocab)
    save_hf(model.state_dict(), args, tmp_path / "hf_model", vocab, text_tokenizer=NEOX_BPE)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block, scope)
    assert scope["model"].config.t2i_ds["image_offset"] == vocab.image_offset
    assert scope["tokenizer"].encode("a cat") == [66, 5798]
