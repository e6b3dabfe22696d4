"""Loading weights builds no random init (meta device, tensors assigned, a mapped file stays mapped); building a
model to train still initialises (and tests/test_train.py's golden losses hold)."""

import pytest
import torch
from safetensors.torch import load_file

from t2i_ds.model import ModelArgs, Transformer, build_model
from t2i_ds.model.checkpoint import build_loaded, load_into, save_open_lm
from t2i_ds.vocab import tiny_vocab


def tiny_args(vocab, **overrides) -> ModelArgs:
    return ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=vocab.size, seq_len=64, loss_impl="torch", **overrides)


@pytest.mark.parametrize("overrides", [{}, {"weight_tying": True}, {"pos_embed": "none"}])
def test_loaded_weights_are_the_files_without_an_init(overrides, tmp_path):
    vocab = tiny_vocab()
    args = tiny_args(vocab, **overrides)
    torch.manual_seed(0)
    trained = build_model(args, vocab.modality_bounds)
    save_open_lm(trained, tmp_path / "m.safetensors")
    sd = load_file(tmp_path / "m.safetensors")  # memory-mapped
    sd = {k: v for k, v in sd.items() if not k.endswith("inv_freq")}  # a checkpoint without the rotary buffers

    rng = torch.get_rng_state()
    model = build_loaded(args, vocab.modality_bounds, sd)
    assert torch.equal(torch.get_rng_state(), rng)  # not one random number drawn: no init ran
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k  # the file's values (inv_freq: computed, the same)
    loaded = dict(model.named_parameters())
    assert all(not p.is_meta for p in model.parameters()) and all(not b.is_meta for b in model.buffers())
    assert loaded["norm.weight"].data_ptr() == sd["norm.weight"].data_ptr()  # assigned, not copied
    if args.weight_tying:
        assert model.output.weight is model.tok_embeddings.weight
    ids = torch.randint(0, vocab.size, (2, 17))
    old = Transformer(args, vocab.modality_bounds)  # the previous way: init, then copy the weights over it
    load_into(old, sd)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), old.eval()(ids))


def test_other_dtypes_are_converted_to_the_models():
    vocab = tiny_vocab()
    args = tiny_args(vocab)
    torch.manual_seed(0)
    sd = {k: v.to(torch.bfloat16) for k, v in build_model(args, vocab.modality_bounds).state_dict().items()}
    model = build_loaded(args, vocab.modality_bounds, sd)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.output.weight, sd["output.weight"].float())


def test_a_model_to_train_is_initialised():
    """build_model (training from scratch) runs open_lm's init from the global RNG: seed in, same weights out."""
    vocab = tiny_vocab()
    args = tiny_args(vocab)
    torch.manual_seed(5)
    a = build_model(args, vocab.modality_bounds)
    torch.manual_seed(5)
    b = build_model(args, vocab.modality_bounds)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    std = a.layers[0].attention.in_proj.weight.std().item()
    assert abs(std - 0.986 / args.dim**0.5) < 0.005  # trunc normal at +-3 std of 1/sqrt(dim): x0.986 by truncation
