"""The 'text' data mode: captions alone, as text-only documents (no image target anywhere)."""

import torch

from t2i_ds.data.config import DataConfig
from t2i_ds.data.loader import TokenLoader
from t2i_ds.vocab import IGNORE, tiny_vocab
from tests.trainer_utils import write_random_shards


def test_text_mode_yields_captions_only(tmp_path):
    vocab = tiny_vocab()
    write_random_shards(tmp_path, n_shards=2, per_shard=10, vocab=vocab, seed=3)
    loader = TokenLoader(DataConfig(path=str(tmp_path), mode="text", num_workers=0), vocab, micro_batch=4)
    batch = next(loader)
    targets = batch["targets"]
    assert not ((targets >= vocab.image_offset) & (targets < vocab.special_offset)).any()  # no image target
    assert (batch["input_ids"][:, :2] == torch.tensor([vocab.doc, vocab.text])).all()
    for row_in, row_t in zip(batch["input_ids"], batch["targets"]):
        n = int((row_t != IGNORE).sum()) + 1  # tokens of the document
        assert row_in[n - 2 : n].tolist() == [vocab.text_end, vocab.doc_end]
