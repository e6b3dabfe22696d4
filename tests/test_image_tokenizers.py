"""The image-tokenizer registry (t2i_ds.data.image_tokenizers): kinds, specs, and who registers the demo's."""

import subprocess
import sys

import pytest
import torch

import t2i_ds.demo  # noqa: F401  (registers "demo")
from t2i_ds.data.image_tokenizers import (image_tokenizer_kinds, load_image_tokenizer, parse_image_tokenizer_spec,
                                          register_image_tokenizer)
from t2i_ds.demo.tokenizer import PatchKMeansTokenizer


def test_both_kinds_are_registered_and_specs_parse():
    assert {"movqgan", "demo", "demo_mask"} <= set(image_tokenizer_kinds())
    assert parse_image_tokenizer_spec("demo:/a/b:c") == ("demo", "/a/b:c")
    for bad, problem in (("movqgan", "must be one of"), ("demo:", "must be one of"), ("vqgan:/x", "unknown image tokenizer kind")):
        with pytest.raises(ValueError, match=problem):
            parse_image_tokenizer_spec(bad)


def test_a_kind_loads_through_its_loader(tmp_path):
    tok = PatchKMeansTokenizer(torch.rand(16, 3 * 4 * 4) * 2 - 1, patch=4, image_size=8)
    tok.save(tmp_path / "tok")
    loaded = load_image_tokenizer(f"demo:{tmp_path / 'tok'}")
    assert isinstance(loaded, PatchKMeansTokenizer) and torch.equal(loaded.codebook, tok.codebook)


def test_a_kind_cannot_be_taken_over():
    with pytest.raises(ValueError, match="already registered"):
        register_image_tokenizer("demo", lambda path: None)
    with pytest.raises(ValueError, match="identifier"):
        register_image_tokenizer("my tok", lambda path: None)


@pytest.mark.parametrize("command", ["t2i_ds.generate", "t2i_ds.eval.__main__", "t2i_ds.prepare", "t2i_ds.inspect_shards"])
def test_commands_that_take_a_spec_know_the_demo_kind_from_a_fresh_interpreter(command):
    """A demo run's `demo:DIR` resolves from a fresh shell: importing the command registers the kind."""
    code = (f"import {command}; from t2i_ds.data.image_tokenizers import image_tokenizer_kinds as k; "
            "assert {'demo', 'demo_mask'} <= set(k()), k()")
    subprocess.run([sys.executable, "-c", code], check=True)
