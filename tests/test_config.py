"""Config fields with one home: moved fields migrate from old config.json files, the presets share the sizes."""

import dataclasses
import json

import pytest

from t2i_ds.config import ConfigError, apply_overrides, from_dict, preset
from t2i_ds.vocab import tiny_vocab


def old_config(**data_fields) -> dict:
    """A config.json as written before data.text_tokenizer was merged into train.text_tokenizer."""
    raw = json.loads(json.dumps(preset("debug").to_dict()))
    raw["data"] = {"path": "/shards", **data_fields}
    raw["train"]["data_source"] = "shards"  # data.* beside synthetic data is refused
    return raw


def test_old_config_with_data_text_tokenizer_migrates():
    cfg = from_dict(old_config(text_tokenizer="/tok/tokenizer.json"))
    assert cfg.train.text_tokenizer == "/tok/tokenizer.json" and cfg.data.path == "/shards"
    raw = old_config(text_tokenizer="/tok/tokenizer.json")
    raw["train"]["text_tokenizer"] = "/tok/tokenizer.json"  # both, the same: fine
    assert from_dict(raw).train.text_tokenizer == "/tok/tokenizer.json"
    raw["data"]["text_tokenizer"] = ""  # the old default beside a set train field
    assert from_dict(raw).train.text_tokenizer == "/tok/tokenizer.json"


def test_old_config_with_two_different_tokenizers_is_refused():
    raw = old_config(text_tokenizer="/a/tokenizer.json")
    raw["train"]["text_tokenizer"] = "/b/tokenizer.json"
    with pytest.raises(ConfigError, match="data.text_tokenizer='/a/tokenizer.json' and train.text_tokenizer="
                                          "'/b/tokenizer.json' differ"):
        from_dict(raw)


def test_the_moved_override_names_its_new_home():
    with pytest.raises(ConfigError, match=r"now train.text_tokenizer \(--set train.text_tokenizer=/t.json\)"):
        apply_overrides(preset("debug"), ["data.path=/shards", "data.text_tokenizer=/t.json"])
    assert apply_overrides(preset("debug"), ["train.text_tokenizer=/t.json"]).train.text_tokenizer == "/t.json"


def test_debug_preset_and_model_use_the_tiny_vocab():
    from t2i_ds.model.args import model_preset

    cfg = preset("debug")
    assert dataclasses.asdict(cfg.vocab.build()) == dataclasses.asdict(tiny_vocab())
    assert model_preset("debug").vocab_size == tiny_vocab().size
    assert cfg.train.tokens_per_step == 4 * tiny_vocab().seq_len


def test_demo_preset_vocab_is_the_demo_sizes():
    import t2i_ds.demo.preset  # noqa: F401  (registers "demo")
    from t2i_ds.demo import shapes
    from t2i_ds.demo.data import DemoSizes

    v, sizes = preset("demo").vocab.build(), DemoSizes()
    assert (v.image_size, v.image_tokens, v.text_size) == (sizes.image_codes, (sizes.image_px // sizes.patch) ** 2 + 1,
                                                           sizes.text_size)  # + 1: the palette token
    assert v.real_text_size == len(shapes.words()) + 2 and v.pad_id == 0  # [PAD] = 0, [UNK] = 1, the words
    assert (v.seq_len, v.image_tokens, v.image_size, v.real_text_size) == (85, 65, 152, 36)  # the documented demo numbers
