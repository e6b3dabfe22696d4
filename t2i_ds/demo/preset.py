"""The `demo` run preset, registered beside the built-in ones of t2i_ds.config; imported by the train command.

`demo`: the captioned-shapes demo (`python -m t2i_ds.demo` generates the data; sizes measured in
benchmarks/demo_sizing.py, whose rows hold the scores: batch 16, LR 2e-3, 1,000 steps; the demo samples at CFG 3,
temperature 0.5).
"""

import dataclasses

from t2i_ds.config import Config, ModelConfig, OptimConfig, TrainConfig, VocabConfig, register_preset
from t2i_ds.data.config import DataConfig
from t2i_ds.demo.data import IMAGE_TOKENIZER, TEXT_TOKENIZER, TOKENIZER_KINDS, DemoSizes, demo_vocab

DEMO_DIR = "runs/demo"


def demo() -> Config:
    """The demo model on the demo shards (the Vocab that make_demo_dataset writes with the default DemoSizes)."""
    vocab = VocabConfig(**dataclasses.asdict(demo_vocab()))  # seq_len 85: 65 image tokens + 6 specials + 14 words
    seq_len = vocab.seq_len
    return Config(
        vocab=vocab,
        model=ModelConfig(preset="demo", overrides={"loss_impl": "torch"}),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, min_lr_ratio=0.1),
        train=TrainConfig(
            tokens_per_step=16 * seq_len, micro_batch=8, steps=1000, log_every=50, ckpt_every=500,
            run_dir=f"{DEMO_DIR}/train", image_tokenizer=f"{TOKENIZER_KINDS[DemoSizes.tokenizer]}:{DEMO_DIR}/data/{IMAGE_TOKENIZER}",
            text_tokenizer=f"{DEMO_DIR}/data/{TEXT_TOKENIZER}",
        ),
        data=DataConfig(path=f"{DEMO_DIR}/data/train", caption_dropout=0.1, num_workers=0),
    )


register_preset("demo", demo)
