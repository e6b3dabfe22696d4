"""prepare: real photos (scikit-learn's china.jpg / flower.jpg) and odd image modes -> token shards -> loader."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i_ds.data.config import DataConfig
from t2i_ds.data.images import SkipImage, center_crop_resize, load_and_prepare, to_rgb
from t2i_ds.data.loader import TokenLoader
from t2i_ds.data.movqgan import MOVQGAN_CONFIGS, MoVQGANTokenizer
from t2i_ds.prepare import main
from t2i_ds.data.shards import list_shards, read_manifest, read_shard
from t2i_ds.data.tokenizers import TextTokenizer
from t2i_ds.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # the tiny MoVQ takes 16 px -> 4x4 codes
VOCAB = Vocab(image_size=64, image_tokens=16, seq_len=48)  # NeoX text ids; 26 caption tokens fit


def jpeg(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(a) for a in load_sample_images().images)  # 427x640 RGB photographs
    rgba = flower.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(flower.size))  # transparent at the top
    return {
        "china": jpeg(china),
        "flower": jpeg(flower),
        "gray": jpeg(china.convert("L")),
        "cmyk": jpeg(flower.convert("CMYK")),
        "palette": jpeg(china.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "rgba": jpeg(rgba, "PNG"),
        "webp": jpeg(flower, "WEBP"),
        "tiny": jpeg(china.resize((9, 6))),
        "broken": jpeg(china)[:300],  # truncated JPEG
    }


def write_input_tar(path: Path, records: list[tuple[str, bytes, str, str | None]]):
    """img2dataset layout: key.<ext> + key.txt (or key.json with "caption")."""
    with tarfile.open(path, "w") as tar:
        for key, data, ext, caption in records:
            members = [(f"{key}.{ext}", data)]
            if caption is not None:
                members.append((f"{key}.txt", caption.encode()))
            members.append((f"{key}.json", f'{{"url": "http://x/{key}"}}'.encode()))
            for name, blob in members:
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


CAPTIONS = {
    "china": "A Chinese temple roof against a blue sky",
    "flower": "a red flower with yellow stamens",
    "gray": "black and white photograph of a pagoda",
    "cmyk": "",  # empty caption: kept
    "palette": "palette image " * 20,  # longer than VOCAB.max_caption_tokens
    "rgba": "flower fading to white",
    "webp": "webp flower",
    "tiny": "a tiny image",
    "broken": "never decoded",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("raw")
    names = list(photos)
    ext = {"palette": "png", "rgba": "png", "webp": "webp"}
    for s in range(3):  # 3 input shards, 3 pairs each (+ synthetic noise images)
        recs = [(f"{s:04d}{i:04d}", photos[n], ext.get(n, "jpg"), CAPTIONS[n]) for i, n in enumerate(names[3 * s : 3 * s + 3])]
        rng = np.random.default_rng(s)
        noise = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8))
        recs.append((f"{s:04d}0099", jpeg(noise), "jpg", None if s == 0 else f"noise {s}"))  # s=0: no caption at all
        write_input_tar(d / f"{s:05d}.tar", recs)
    return d


@pytest.fixture(scope="module")
def movq_dir(tmp_path_factory):
    from diffusers import VQModel

    torch.manual_seed(0)
    model = VQModel(**MOVQGAN_CONFIGS["tiny"])
    model.quantize.embedding.weight.data.normal_()
    path = tmp_path_factory.mktemp("movq")
    model.save_pretrained(path)
    return path


def prepare_args(inputs, out, movq_dir, *extra):
    return ["--input", str(inputs), "--out", str(out), "--image-tokenizer", f"movqgan:{movq_dir}",
            "--image-size", str(SIZE), "--batch-size", "4", "--decode-workers", "2",
            "--max-caption-tokens", str(VOCAB.max_caption_tokens), *extra]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, inputs, movq_dir):
    out = tmp_path_factory.mktemp("tok")
    main(prepare_args(inputs, out, movq_dir))
    return out


# ---- images ------------------------------------------------------------------------------------------
def test_odd_modes_become_rgb(photos):
    for name in ("gray", "cmyk", "palette", "rgba", "webp"):
        x, (w, h), mode = load_and_prepare(photos[name], SIZE)
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1, name
        assert (w, h) == (640, 427)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red -> white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    gray, _, _ = load_and_prepare(photos["gray"], SIZE)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_center_crop_and_small_images():
    img = Image.new("RGB", (30, 10))
    img.paste((255, 0, 0), (10, 0, 20, 10))  # the central 10x10 square is red
    out = center_crop_resize(img, 10)
    assert out.size == (10, 10) and (np.asarray(out) == (255, 0, 0)).all()
    assert center_crop_resize(img, 20).size == (20, 20)  # upscaled
    with pytest.raises(SkipImage, match="too_small"):
        center_crop_resize(img, 20, small="skip")


# ---- prepare end to end --------------------------------------------------------------------------------
def test_prepare_writes_shards_and_summary(prepared, photos, movq_dir):
    shards = list_shards(prepared)
    assert [Path(p).name for p in shards] == ["tokens-000000.tar", "tokens-000001.tar", "tokens-000002.tar"]
    m = read_manifest(prepared)
    assert m["image_tokenizer"]["grid"] == [4, 4] and m["image_tokenizer"]["codebook_size"] == 64
    assert m["text_tokenizer"]["vocab_size"] == 50_277
    assert m["stats"]["samples"] == 11 and m["stats"]["skipped"] == {"undecodable": 1}
    assert m["stats"]["empty_captions"] == 2  # cmyk's "" and the caption-less noise image

    samples = {s.key: s for p in shards for s in read_shard(p)}
    tok = MoVQGANTokenizer.load(movq_dir, image_size=SIZE, device="cpu")
    text = TextTokenizer()
    china = samples["00000000"]
    x, _, _ = load_and_prepare(photos["china"], SIZE)
    assert np.array_equal(china.codes, tok.encode(x[None])[0].numpy().astype(np.uint16))
    assert china.caption_ids.tolist() == text.encode(CAPTIONS["china"])
    assert china.meta == {"key": "00000000", "source_shard": "00000.tar", "width": 640, "height": 427,
                          "mode": "RGB", "url": "http://x/00000000"}
    assert samples["00010001"].meta["mode"] == "P"
    assert len(samples["00010001"].caption_ids) > VOCAB.max_caption_tokens  # stored untruncated


def test_prepared_shards_through_the_loader(prepared):
    loader = TokenLoader(DataConfig(path=str(prepared), num_workers=0), VOCAB, micro_batch=11)
    x = next(loader)["input_ids"]  # one epoch: all 11 samples, compared as a set of rows
    assert x.shape == (11, 48) and x.dtype == torch.int64
    samples = [s for p in list_shards(prepared) for s in read_shard(p)]
    expect = set()
    for s in samples:
        caption = s.caption_ids.tolist()[: VOCAB.max_caption_tokens]
        row = [VOCAB.doc, VOCAB.text, *caption, VOCAB.text_end, VOCAB.image,
               *(VOCAB.image_offset + s.codes.astype(np.int64)).tolist(), VOCAB.image_end, VOCAB.doc_end]
        expect.add(tuple(row + [VOCAB.pad_id] * (48 - len(row))))
    assert {tuple(r) for r in x.tolist()} == expect
    assert loader.stats["truncated_captions"] == 1


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_skipped_records_are_listed_with_reasons(prepared):
    broken = {"key": "00020002", "reason": "undecodable", "source": "00002.tar"}
    assert read_jsonl(prepared / "tokens-000002.skipped.jsonl") == [broken]
    assert sorted(p.name for p in prepared.glob("*.skipped.jsonl")) == ["tokens-000002.skipped.jsonl"]
    assert read_jsonl(prepared / "skipped.jsonl") == [{"shard": "tokens-000002.tar", **broken}]


def test_outputs_are_readable_like_any_file(prepared):
    """Shards, sidecars, manifest and skip lists honour the umask (atomic writes used to make them 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    files = [p for p in prepared.iterdir() if p.is_file()]
    assert len(files) == 3 + 3 + 1 + 1 + 1  # tars, stats sidecars, one skip sidecar, manifest, skipped.jsonl
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}


def test_skip_small_images(tmp_path, inputs, movq_dir, capsys):
    m = main(prepare_args(inputs, tmp_path, movq_dir, "--small-images", "skip"))
    assert m["stats"]["skipped"] == {"too_small": 1, "undecodable": 1}
    assert m["stats"]["samples"] == 10
    assert [(r["key"], r["reason"]) for r in read_jsonl(tmp_path / "skipped.jsonl")] == [
        ("00020001", "too_small"), ("00020002", "undecodable")]
    assert f"skipped records (key, reason, source): {tmp_path / 'skipped.jsonl'}" in capsys.readouterr().out


def test_ranks_split_inputs_and_match_one_process(tmp_path, inputs, movq_dir, prepared):
    for rank in (1, 0):
        main(prepare_args(inputs, tmp_path, movq_dir, "--rank", str(rank), "--world-size", "2"))
    assert [Path(p).name for p in list_shards(tmp_path)] == [Path(p).name for p in list_shards(prepared)]
    for a, b in zip(list_shards(tmp_path), list_shards(prepared)):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert read_manifest(tmp_path)["stats"] == read_manifest(prepared)["stats"]


def test_killed_run_resumes_without_duplicates_or_gaps(tmp_path, photos, movq_dir):
    """SIGKILL from outside once two of nine shards exist; the rerun finishes the rest, byte-identical to an
    uninterrupted run, and removes the temporaries the killed writer left (and nothing else)."""
    from t2i_ds.atomic import _host

    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in photos.items():  # one pair per output shard: nine units, the kill lands mid-run
        (folder / f"{name}.png").write_bytes(data)
        (folder / f"{name}.txt").write_text(CAPTIONS[name])
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = prepare_args(folder, out, movq_dir, "--samples-per-shard", "1")
    proc = subprocess.Popen([sys.executable, "-m", "t2i_ds.prepare", *args], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    main(prepare_args(folder, ref, movq_dir, "--samples-per-shard", "1"))  # the reference, meanwhile
    deadline = time.time() + 300
    while len(list(out.glob("tokens-*.tar"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -9, err[-2000:]  # killed, not finished
    assert 2 <= len(list_shards(out)) < 9
    # what a writer killed between create and rename leaves: a temporary named after its (now dead) pid
    left = out / f".tokens-000008.stats.json.{_host()}.{proc.pid}.0123abcd.tmp"
    left.write_text("{")
    foreign = [out / ".notes.tmp", out / f".tokens-000008.tar.{_host()}.{os.getpid()}.0123abcd.tmp"]
    for f in foreign:  # someone else's file, and a temporary of a live writer (this process): both kept
        f.write_text("x")
    main(args)  # resume in-process
    assert not left.exists() and all(f.exists() for f in foreign)
    keys = [s.key for p in list_shards(out) for s in read_shard(p)]
    assert len(keys) == len(set(keys)) == 8  # nine pairs, the truncated JPEG skipped
    for a, b in zip(list_shards(out), list_shards(ref), strict=True):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    assert (out / "skipped.jsonl").read_bytes() == (ref / "skipped.jsonl").read_bytes()


def test_refuses_a_different_tokenizer_in_the_same_dir(tmp_path, inputs, movq_dir, prepared):
    import shutil

    shutil.copytree(prepared, tmp_path / "out")
    with pytest.raises(ValueError, match="text_tokenizer"):
        tok_dir = tmp_path / "hf"
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_file=str(TextTokenizer().path)).save_pretrained(tok_dir)
        main(prepare_args(inputs, tmp_path / "out", movq_dir, "--text-tokenizer", str(tok_dir)))


def test_folder_and_csv_inputs(tmp_path, photos, movq_dir):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("china", "flower", "gray"):
        (folder / f"{name}.v1.jpg").write_bytes(photos[name])
        (folder / f"{name}.v1.txt").write_text(CAPTIONS[name])
    m = main(prepare_args(folder, tmp_path / "f", movq_dir, "--samples-per-shard", "2"))
    assert [s["samples"] for s in m["shards"]] == [2, 1]
    keys = {s.key: s for p in list_shards(tmp_path / "f") for s in read_shard(p)}
    assert keys["china_v1_jpg"].caption == CAPTIONS["china"]
    (tmp_path / "pairs.csv").write_text("image,caption\nfolder/china.v1.jpg,a temple\nfolder/flower.v1.jpg,\n")
    m = main(prepare_args(tmp_path / "pairs.csv", tmp_path / "c", movq_dir))
    assert m["stats"]["samples"] == 2 and m["stats"]["empty_captions"] == 1


def test_decode_shards_back_to_images(tmp_path, prepared, movq_dir):
    from t2i_ds.data.decode_shards import decode_shards

    paths = decode_shards(str(prepared), f"movqgan:{movq_dir}", tmp_path, n=5)
    assert len(paths) == 5
    img = Image.open(paths[0])
    assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    assert (tmp_path / f"{paths[0].stem}.txt").read_text().startswith(CAPTIONS["china"])


def test_input_without_a_usable_image_writes_no_shard_and_says_why(tmp_path, photos, movq_dir, capsys, caplog):
    """Every record broken: exit 2 with one line (counts by reason), no .tar and no manifest left, the records
    listed; a broken unit beside a good one: no empty shard for it, a warning line, exit 0."""
    from t2i_ds.cli import run

    bad = tmp_path / "bad"
    bad.mkdir()
    write_input_tar(bad / "00000.tar", [("k1", photos["broken"], "jpg", "x"), ("k2", b"not an image", "jpg", "y")])
    write_input_tar(bad / "00001.tar", [("k3", b"\x89PNG garbage", "png", "z")])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        run("t2i_ds.prepare", lambda: main(prepare_args(bad, out, movq_dir)))
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # (diffusers warns too)
    assert errors == [
        f"t2i_ds.prepare: error: no shard written to {out}: not one of the 3 records of --input {bad} (2 input units) "
        f"gave a usable image (undecodable 3); the records and reasons are in {out / 'skipped.jsonl'}"]
    assert sorted(p.name for p in out.iterdir()) == ["skipped.jsonl", "tokens-000000.skipped.jsonl",
                                                    "tokens-000001.skipped.jsonl"]
    assert [(r["shard"], r["key"], r["reason"]) for r in read_jsonl(out / "skipped.jsonl")] == [
        (None, "k1", "undecodable"), (None, "k2", "undecodable"), (None, "k3", "undecodable")]

    write_input_tar(bad / "00001.tar", [("k3", photos["china"], "jpg", "z")])  # one unit fixed: a rerun redoes it
    m = main(prepare_args(bad, out, movq_dir))
    assert [s["name"] for s in m["shards"]] == ["tokens-000001.tar"] and not (out / "tokens-000000.tar").exists()
    assert "input 00000.tar: no usable image (undecodable 2): no shard written" in caplog.text
    assert [(r["shard"], r["key"]) for r in read_jsonl(out / "skipped.jsonl")] == [(None, "k1"), (None, "k2")]
