"""The `demo` run preset, registered beside the built-in ones of t2i_ds.config; imported by the train command.

`demo`: the captioned-shapes demo (`python -m t2i_ds.demo` generates the data; sizes measured in
benchmarks/demo_sizing.py: batch 16, LR 2e-3, 1,000 steps give a colour consistency of ~0.97 with
CFG 3 after ~2 minutes of plain-torch training on 2 CPU cores).
"""

from t2i_ds.config import Config, ModelConfig, OptimConfig, TrainConfig, VocabConfig, register_preset
from t2i_ds.data.config import DataConfig

DEMO_DIR = "runs/demo"


def demo() -> Config:
    """The demo model on the demo shards (vocab sizes as make_demo_dataset writes them)."""
    seq_len = 81  # 64 image tokens (32 px / 4 px patches) + 6 specials + 11 caption words
    return Config(
        vocab=VocabConfig(text_size=64, image_size=256, image_tokens=64, seq_len=seq_len, pad_id=0, real_text_size=36),
        model=ModelConfig(preset="demo", overrides={"loss_impl": "torch"}),
        optim=OptimConfig(lr=2e-3, warmup_steps=50, min_lr_ratio=0.1),
        train=TrainConfig(
            tokens_per_step=16 * seq_len, micro_batch=8, steps=1000, log_every=50, ckpt_every=500,
            run_dir=f"{DEMO_DIR}/train", image_tokenizer=f"demo:{DEMO_DIR}/data/image_tokenizer",
            text_tokenizer=f"{DEMO_DIR}/data/tokenizer.json",
        ),
        data=DataConfig(path=f"{DEMO_DIR}/data/train", caption_dropout=0.1, num_workers=0, shuffle_buffer=1000),
    )


register_preset("demo", demo)
