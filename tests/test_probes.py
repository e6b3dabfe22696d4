"""Forgetting probes (paper Table 1) on a tiny model with the real NeoX tokenizer."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from t2i_ds.trainer.probes import (
    TextProbes,
    exact_match,
    greedy_complete,
    paper_prompts,
    translation_pairs,
    translation_prompt,
)
from t2i_ds.model import build_model, model_preset
from t2i_ds.vocab import Vocab

VOCAB = Vocab(image_size=64, image_tokens=16, seq_len=128)  # the real 50,432 text rows, small images
METRICS = {"probe/heldout_loss", "probe/heldout_ppl", "probe/translation_exact_match"}
TEXTS = {"probe/relativity", "probe/translation", "probe/translation_table"}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    args = model_preset("debug", dim=32, n_layers=1, n_heads=2, vocab_size=VOCAB.size, loss_impl="torch")
    return build_model(args, VOCAB.modality_bounds)


@pytest.fixture(scope="module")
def probes(neox_tokenizer):
    return TextProbes(neox_tokenizer, VOCAB, max_new_tokens=8, max_answer_tokens=4)


def test_translation_prompt_is_gpt3_format():
    assert paper_prompts()["translation"] == (
        "Translate English to French:\nsea otter => loutre de mer\npeppermint => menthe poivrée\n"
        "plush girafe => girafe peluche\ncheese =>"
    )
    assert paper_prompts()["relativity"] == "Simply put, the theory of relativity states that"
    pairs = translation_pairs()
    assert ("cheese", "fromage") in pairs[3:] and len(pairs) - 3 >= 10
    assert translation_prompt([("a", "b")], "c") == "Translate English to French:\na => b\nc =>"


@pytest.mark.parametrize(
    "completion, ok", [(" fromage\nsalt => sel", True), (" Fromage ", True), (" fromage blanc", False), ("\nfromage", False), (" I love cheese", False)]
)
def test_exact_match(completion, ok):
    assert exact_match(completion, "fromage") is ok


class PeakedLM(nn.Module):
    """Logits that prefer image id T+3 over text id 42 at every step."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward_with_cache(self, ids, past=None):
        self.calls.append(ids.shape[1])
        logits = torch.zeros(1, VOCAB.size)
        logits[0, VOCAB.image_offset + 3], logits[0, 42] = 10.0, 5.0
        return logits, []


def test_greedy_stays_in_real_text_ids_and_uses_the_cache():
    lm = PeakedLM()
    assert greedy_complete(lm, [5, 6, 7], 4, VOCAB.real_text_size) == [42] * 4
    assert lm.calls == [3, 1, 1, 1]  # prompt once, then one new token per step
    assert greedy_complete(PeakedLM(), [5], 10, VOCAB.real_text_size, stop=lambda new: len(new) == 2) == [42, 42]


def test_run_keys_texts_and_determinism(probes):
    model = tiny_model()
    model.train()
    first, second = probes.run(model), probes.run(model)
    assert set(first.metrics) == METRICS and set(first.texts) == TEXTS
    assert first.metrics == second.metrics and first.texts == second.texts  # greedy is deterministic
    assert model.training and torch.is_grad_enabled()  # mode restored
    assert all(isinstance(t, str) and t for t in first.texts.values())
    assert first.texts["probe/translation_table"].count("\n") == 1 + len(probes.queries)
    assert math.log(VOCAB.size) - 1 < first.metrics["probe/heldout_loss"] < math.log(VOCAB.size) + 1  # untrained
    assert first.metrics["probe/heldout_ppl"] == pytest.approx(math.exp(first.metrics["probe/heldout_loss"]))
    assert first.metrics["probe/translation_exact_match"] == 0.0  # an untrained model knows no French
    model.eval()
    probes.run(model)
    assert not model.training


class ScriptedLM(nn.Module):
    """Answers a translation prompt with the reference French word when it knows the English one, else with a
    wrong word; any other prompt gets a fixed text. Its held-out loss is 2 nats per target."""

    def __init__(self, tokenizer, known: dict[str, str]):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.known = tokenizer, known

    def forward(self, x, y):
        count = (y >= 0).sum().float()
        return SimpleNamespace(loss_sum=2.0 * count, count=count)

    def forward_with_cache(self, ids, past=None):
        if past is None:  # the prompt: decide the whole answer
            prompt = self.tokenizer.decode(ids[0].tolist())
            query = prompt.rsplit("\n", 1)[-1].removesuffix(" =>")
            text = f" {self.known.get(query, 'bonjour')}\nsalt => sel" if prompt.startswith("Translate") else " it is fast."
            past = (self.tokenizer.encode(text).ids, 0)
        answer, i = past
        logits = torch.zeros(1, VOCAB.size)
        logits[0, answer[min(i, len(answer) - 1)]] = 1.0
        return logits, (answer, i + 1)


def test_translation_exact_match_counts_the_right_answers(neox_tokenizer):
    probes = TextProbes(neox_tokenizer, VOCAB, max_new_tokens=8, max_answer_tokens=16)
    known = dict(probes.queries[: len(probes.queries) // 2 + 1])  # a little over half of the words
    result = probes.run(ScriptedLM(neox_tokenizer, known))
    assert result.metrics["probe/translation_exact_match"] == pytest.approx(len(known) / len(probes.queries))
    table = result.texts["probe/translation_table"].splitlines()[2:]
    assert [row.endswith("| yes |") for row in table] == [en in known for en, _ in probes.queries]
    assert result.texts["probe/relativity"] == " it is fast" + "." * 5  # 8 new tokens, the last one repeated
    assert result.metrics["probe/heldout_loss"] == pytest.approx(2.0)


def test_heldout_samples_are_text_only_format(probes):
    inputs, targets = probes.heldout
    assert (targets >= 0).sum().item() == len(probes.encode(_heldout_text()))  # each token a target once
    assert (inputs[:, 0] == VOCAB.doc).all() and (inputs[:, 1] == VOCAB.text).all()
    assert ((targets < VOCAB.text_size) | (targets == -100)).all()  # no special targets


def _heldout_text():
    from t2i_ds.trainer.probes import read_asset

    return read_asset("heldout_text.txt")


def test_training_on_heldout_text_lowers_probe_loss(probes):
    model = tiny_model()
    before = probes.run(model).metrics["probe/heldout_loss"]
    trained = copy.deepcopy(model)
    opt = torch.optim.AdamW(trained.parameters(), lr=1e-2)
    inputs, targets = probes.heldout
    for _ in range(5):
        out = trained(inputs, targets)
        (out.loss_sum / out.count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = probes.run(trained).metrics["probe/heldout_loss"]
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < before - 1.0
    assert probes.run(model).metrics["probe/heldout_loss"] == before  # the untrained model is untouched
