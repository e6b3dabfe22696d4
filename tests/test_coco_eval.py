"""COCO-30K as users run it: the caption list, sharded and resumable generation (kill, rerun, other rank counts:
the same files byte for byte), the CLIP score from a local model, and `eval fid --images --clip` over a folder
written by the generation command.
"""

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from t2i_ds import generate as gen_mod
from t2i_ds.eval import generation
from t2i_ds.eval.__main__ import main as eval_main

CAPTIONS = ["a red circle", "a blue square on grass", "two cats", "a red circle", "sky", "a green triangle top left",
            "a yellow star", "an empty room with a chair", "three dogs"]


# ----------------------------------------------------------------------------------------------------------------
# The caption list
# ----------------------------------------------------------------------------------------------------------------


def write_annotations(path, n_images=40, seed=0, shuffle=False):
    rng = random.Random(seed)
    images = [{"id": 1000 + 7 * k, "file_name": f"COCO_val2014_{1000 + 7 * k:012d}.jpg"} for k in range(n_images)]
    annotations, aid = [], 1
    for im in images:
        for j in range(rng.randint(3, 6)):
            annotations.append({"image_id": im["id"], "id": aid, "caption": f"  image {im['id']}\ncaption {j} "})
            aid += 1
    if shuffle:  # the selection must not depend on the order of the file's lists
        rng.shuffle(images)
        rng.shuffle(annotations)
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_captions_one_per_image_reproducibly(tmp_path, capsys):
    ann = write_annotations(tmp_path / "captions_val2014.json")
    out = tmp_path / "coco.jsonl"
    assert eval_main(["coco-captions", "--annotations", str(ann), "--n", "25", "--seed", "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(25))
    assert len({r["image_id"] for r in rows}) == 25 and [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    for r in rows:  # the caption is one of that image's, whitespace collapsed
        assert r["caption"].startswith(f"image {r['image_id']} caption ") and "\n" not in r["caption"]
        assert r["file_name"] == f"COCO_val2014_{r['image_id']:012d}.jpg"
    assert len({r["caption"].split()[-1] for r in rows}) > 1  # not always the first caption
    meta = json.loads(generation.meta_path(out).read_text())
    assert meta["n"] == 25 and meta["seed"] == 0 and meta["images_total"] == 40 and len(meta["annotations_sha256"]) == 64
    assert generation.read_captions(out, None) == [r["caption"] for r in rows]

    again = tmp_path / "again.jsonl"  # same file content in another order, same seed: the same list, byte for byte
    shuffled = write_annotations(tmp_path / "shuffled.json", shuffle=True)
    eval_main(["coco-captions", "--annotations", str(shuffled), "--n", "25", "--seed", "0", "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()
    other = tmp_path / "other.jsonl"
    eval_main(["coco-captions", "--annotations", str(ann), "--n", "25", "--seed", "1", "--out", str(other)])
    assert other.read_bytes() != out.read_bytes()
    with pytest.raises(ValueError, match="captions for 40 images"):
        eval_main(["coco-captions", "--annotations", str(ann), "--n", "41", "--out", str(other)])
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(ValueError, match="not a COCO captions file"):
        eval_main(["coco-captions", "--annotations", str(tmp_path / "bad.json"), "--out", str(other)])


# ----------------------------------------------------------------------------------------------------------------
# Sharded, resumable generation
# ----------------------------------------------------------------------------------------------------------------


class WordIds:
    def encode_batch(self, texts):
        return [[10 + sum(map(ord, w)) % 250 for w in t.split()] for t in texts]


@pytest.fixture(scope="module")
def fake_run():
    from t2i_ds.demo.tokenizer import PatchKMeansTokenizer
    from t2i_ds.model.args import model_preset
    from t2i_ds.model.transformer import build_model
    from t2i_ds.vocab import tiny_vocab

    vocab = tiny_vocab()
    torch.manual_seed(0)
    args = model_preset("debug", vocab_size=vocab.size, seq_len=vocab.seq_len, loss_impl="torch", attn_backend="sdpa")
    codebook = torch.rand(vocab.image_size, 3 * 8 * 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return SimpleNamespace(model=build_model(args, vocab.modality_bounds).eval(), vocab=vocab, cfg=None,
                           text_tokenizer=WordIds(), image_tokenizer=PatchKMeansTokenizer(codebook, patch=8, image_size=32))


KW = dict(cfg_scale=2.0, top_k=16, temperature=1.0, seed=7, log=lambda s: None)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_sharded_generation_killed_and_rerun_at_other_rank_counts(fake_run, tmp_path, monkeypatch):
    one = tmp_path / "one"
    generation.generate_folder(fake_run, CAPTIONS, one, batch_size=4, **KW)  # one process, batches of 4
    reference = files(one)
    assert sorted(reference) == [f"{i:06d}.png" for i in range(len(CAPTIONS))]
    # captions 0 and 3 are the same text: two indices, two images (the noise is keyed by the index)
    assert len(set(reference.values())) == len(CAPTIONS) and reference["000000.png"] != reference["000003.png"]

    # Two ranks, rank 0 killed after writing 2 images; rerun both: the same files.
    two = tmp_path / "two"
    written = []
    real_write = generation.write_png

    def dying_write(image, path):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(path.name)
        real_write(image, path)

    monkeypatch.setattr(generation, "write_png", dying_write)
    with pytest.raises(KeyboardInterrupt):
        generation.generate_folder(fake_run, CAPTIONS, two, batch_size=3, rank=0, world=2, **KW)
    monkeypatch.setattr(generation, "write_png", real_write)
    assert sorted(p.name for p in two.glob("*.png")) == sorted(written)  # no partial files (atomic writes)
    summary = generation.generate_folder(fake_run, CAPTIONS, two, batch_size=3, rank=0, world=2, **KW)
    assert summary["captions"] == 5 and summary["generated"] == 3  # indices 0, 2, 4, 6, 8; two were done
    generation.generate_folder(fake_run, CAPTIONS, two, batch_size=3, rank=1, world=2, **KW)
    assert files(two) == reference

    # Three ranks through the command (RANK / WORLD_SIZE from the environment, as a launcher sets them).
    from t2i_ds import inference

    monkeypatch.setattr(inference, "load_run", lambda run_dir, **kw: fake_run)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"caption": c}) + "\n" for c in CAPTIONS))
    three = tmp_path / "three"
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        gen_mod.main(["--checkpoint", "run", "--captions_file", str(tmp_path / "c.jsonl"), "--out_dir", str(three),
                      "--cfg_scale", "2", "--top_k", "16", "--seed", "7", "--batch_size", "2", "--local_rank", "0"])
    assert files(three) == reference
    # A rerun with other settings into the same folder is refused (its images would mix with these).
    with pytest.raises(ValueError, match="other settings"):
        gen_mod.main(["--checkpoint", "run", "--captions_file", str(tmp_path / "c.jsonl"), "--out_dir", str(three),
                      "--cfg_scale", "2", "--top_k", "16", "--seed", "8"])
    # One caption alone (--indices), keyed by its index: the same file again.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    alone = tmp_path / "alone"
    gen_mod.main(["--checkpoint", "run", "--captions_file", str(tmp_path / "c.jsonl"), "--out_dir", str(alone),
                  "--indices", "5", "--cfg_scale", "2", "--top_k", "16", "--seed", "7"])
    assert files(alone) == {"000005.png": reference["000005.png"]}


def test_launcher_rank_from_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert generation.launcher_rank() == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert generation.launcher_rank() == (3, 8)
    monkeypatch.setenv("RANK", "8")
    with pytest.raises(ValueError, match="RANK=8"):
        generation.launcher_rank()


# ----------------------------------------------------------------------------------------------------------------
# CLIP score and the FID command over a generated folder
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (model, byte-level tokenizer, PIL image processor) saved locally, as a user's copy would be."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    try:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4.x
        from transformers import CLIPImageProcessor as ImageProcessor

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    V = len(vocab)
    text = dict(vocab_size=V, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=V - 2, eos_token_id=V - 1, pad_token_id=V - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(image_processor=ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_clip_score_matches_clip_similarity(clip_dir):
    from t2i_ds.eval.clip_score import ClipScorer

    scorer = ClipScorer(clip_dir)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    captions = ["a red circle", "two cats on a long sofa", "sky", "x" * 300]  # the last one is truncated to 77 tokens
    got = scorer.cosines(images, captions)
    inputs = scorer.processor(text=captions, images=images, return_tensors="pt", padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        out = scorer.model(**inputs)  # logits_per_image = logit_scale * cos(normalised embeddings)
    want = out.logits_per_image.diag().double() / scorer.model.logit_scale.exp().double()
    print("clip cosines", got.tolist())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(set(got.tolist())) == 4  # the captions matter
    torch.testing.assert_close(scorer.scores(images, captions), 100 * got.clamp(min=0), rtol=0, atol=0)
    d = scorer.describe()
    assert len(d["clip_sha256"]) == 64 and "100 * max(cos" in d["clip_score_formula"]


def test_clip_model_missing_is_a_clear_error(tmp_path):
    from t2i_ds.eval.clip_score import ClipScorer

    with pytest.raises(FileNotFoundError, match="never downloads"):
        ClipScorer(tmp_path / "clip-vit-large-patch14")


def test_fid_and_clip_over_a_generated_folder(fake_run, clip_dir, tmp_path, monkeypatch):
    from tests.test_fid import TinyInception, write_images

    inception = tmp_path / "inception.pt"
    torch.manual_seed(0)
    torch.jit.script(TinyInception()).save(str(inception))
    ann = write_annotations(tmp_path / "captions_val2014.json", n_images=12)
    captions = tmp_path / "coco.jsonl"
    eval_main(["coco-captions", "--annotations", str(ann), "--n", "6", "--seed", "0", "--out", str(captions)])
    samples = tmp_path / "samples"
    texts = generation.read_captions(captions, None)
    for rank in range(2):  # as two launcher ranks would
        generation.generate_folder(fake_run, texts, samples, rank=rank, world=2, batch_size=4, **KW)
    write_images(tmp_path / "ref", 6, seed=12)
    monkeypatch.setattr("t2i_ds.eval.__main__.load_run", lambda *a: pytest.fail("no model is loaded with --images"))
    assert eval_main(["fid", "--images", str(samples), "--captions", str(captions), "--reference", str(tmp_path / "ref"),
                      "--inception", str(inception), "--clip", str(clip_dir), "--out", str(tmp_path / "eval"),
                      "--n", "6", "--resize", "64", "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eval" / "fid.jsonl").read_text())
    assert np.isfinite(report["fid"]) and report["n"] == 6 and 0 <= report["clip_score"] <= 100
    assert report["caption_selection"]["n"] == 6 and report["caption_selection"]["seed"] == 0
    assert report["generation"]["seed"] == 7 and report["seed"] == 7 and report["top_k"] == 16
    assert report["clip_sha256"] and "GigaGAN" in report["protocol"] and report["images"] == str(samples.resolve())
    (samples / "000004.png").unlink()  # an unfinished folder is refused, with the way out
    with pytest.raises(FileNotFoundError, match="1 of 6 images missing.*rerun it"):
        eval_main(["fid", "--images", str(samples), "--captions", str(captions), "--reference", str(tmp_path / "ref"),
                   "--inception", str(inception), "--out", str(tmp_path / "eval"), "--n", "6", "--resize", "64"])
