"""Token shard format: writer, atomicity, manifest, listing."""

import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from t2i_ds.data.shards import (
    FORMAT,
    ShardSample,
    SkippedRecord,
    TokenShardWriter,
    list_shards,
    read_manifest,
    read_shard,
    skipped_path,
    stats_path,
    write_shard,
    write_skipped_list,
)

META = {"image_tokenizer": {"name": "t", "codebook_size": 64, "grid": [4, 4], "image_size": 16},
        "text_tokenizer": {"name": "neox", "vocab_size": 50277}}


def write_samples(out, n=7, per_shard=3):
    with TokenShardWriter(out, samples_per_shard=per_shard, meta=META) as w:
        for i in range(n):
            w.write(f"{i:05d}", np.arange(16) + i, np.arange(i), f"caption {i}", {"width": 10 + i, "height": 20})
    return w


def test_writer_round_trip_and_dtypes(tmp_path):
    w = write_samples(tmp_path)
    shards = list_shards(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in shards] == ["tokens-000000.tar", "tokens-000001.tar", "tokens-000002.tar"]
    assert w.shards_written == shards
    samples = [s for p in shards for s in read_shard(p)]
    assert [s.key for s in samples] == [f"{i:05d}" for i in range(7)]
    s = samples[4]
    assert s.codes.dtype == np.uint16 and s.codes.shape == (16,) and np.array_equal(s.codes, np.arange(16) + 4)
    assert s.caption_ids.dtype == np.int32 and np.array_equal(s.caption_ids, np.arange(4))
    assert s.caption == "caption 4" and s.meta == {"key": "00004", "width": 14, "height": 20}


def test_webdataset_reads_members(tmp_path):
    write_samples(tmp_path, n=3)
    (sample,) = list(wds.WebDataset(list_shards(tmp_path)[0], shardshuffle=False, empty_check=False))[:1]
    assert {"codes.npy", "ids.npy", "txt", "json"} <= set(sample)
    assert sample["__key__"] == "00000"
    assert np.load(io.BytesIO(sample["codes.npy"])).dtype == np.uint16


def test_manifest(tmp_path):
    write_samples(tmp_path)
    m = read_manifest(tmp_path)
    assert m["format"] == FORMAT
    assert m["image_tokenizer"] == META["image_tokenizer"] and m["text_tokenizer"] == META["text_tokenizer"]
    assert [s["samples"] for s in m["shards"]] == [3, 3, 1]
    assert m["stats"]["samples"] == 7 and m["stats"]["empty_captions"] == 1
    assert m["stats"]["caption_tokens"] == {"mean": 3.0, "max": 6, "p50": 3, "p90": 6, "p99": 6}


def test_write_shard_records_skips_and_is_deterministic(tmp_path):
    samples = [ShardSample("a", np.zeros(4, int), np.array([1, 2]), "x", {"width": 1})]
    skipped = [SkippedRecord("b", "undecodable", "in-0.tar"), SkippedRecord("c", "no_image", "in-0.tar"),
               SkippedRecord("d", "undecodable", "in-0.tar")]
    write_shard(tmp_path / "s-000000.tar", samples, skipped)
    write_shard(tmp_path / "t-000000.tar", samples, skipped)
    write_shard(tmp_path / "s-000001.tar", samples)
    assert (tmp_path / "s-000000.tar").read_bytes() == (tmp_path / "t-000000.tar").read_bytes()
    assert json.loads(stats_path(tmp_path / "s-000000.tar").read_text())["skipped"] == {"no_image": 1, "undecodable": 2}
    rows = [json.loads(line) for line in skipped_path(tmp_path / "s-000000.tar").read_text().splitlines()]
    assert rows == [r.to_json() for r in skipped]
    assert not skipped_path(tmp_path / "s-000001.tar").exists()  # nothing skipped: no list
    path, n = write_skipped_list(tmp_path, prefix="s")
    assert n == 3 and [json.loads(line) for line in path.read_text().splitlines()] == [
        {"shard": "s-000000.tar", **r.to_json()} for r in skipped]
    write_shard(tmp_path / "s-000000.tar", samples)  # redone without skips: the old list goes
    assert not skipped_path(tmp_path / "s-000000.tar").exists() and write_skipped_list(tmp_path, prefix="s")[1] == 0


def test_failed_writer_leaves_no_partial_tar(tmp_path, monkeypatch):
    import t2i_ds.data.shards as shards

    from t2i_ds.atomic import atomic_open

    def half_then_killed(path, data):
        with atomic_open(path, "wb") as f:
            f.write(data[: len(data) // 2])
            raise KeyboardInterrupt  # killed while writing the bytes

    write_samples(tmp_path, n=3, per_shard=3)
    monkeypatch.setattr(shards, "atomic_write_bytes", half_then_killed)
    with pytest.raises(KeyboardInterrupt):
        write_samples(tmp_path / "b", n=3, per_shard=3)
    assert list((tmp_path / "b").glob("*.tar")) == []
    assert list((tmp_path / "b").glob(".*")) == []  # the partial temporary is removed too
    assert len(list_shards(tmp_path)) == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(key="a.b"), "without '.'"),
        (dict(codes=np.array([-1, 2])), r"\[0, 65535\]"),
        (dict(codes=np.zeros((2, 2), int)), "1-D integer"),
        (dict(caption_ids=np.array([0.5])), "caption_ids"),
    ],
)
def test_writer_rejects_bad_samples(tmp_path, bad, match):
    args = dict(key="k", codes=np.zeros(4, int), caption_ids=np.array([1]), caption="c")
    args.update(bad)
    w = TokenShardWriter(tmp_path, meta=META)
    with pytest.raises(ValueError, match=match):
        w.write(**args)


def test_duplicate_key_in_a_shard_is_an_error(tmp_path):
    s = ShardSample("k", np.zeros(4, int), np.array([1]), "c")
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        write_shard(tmp_path / "x-000000.tar", [s, s])


def test_list_shards_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list_shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokens-000001"):
        write_samples(tmp_path, n=3, per_shard=3)
        list_shards(str(tmp_path / "tokens-{000000..000001}.tar"))


def test_list_shards_glob_brace_and_multi(tmp_path):
    write_samples(tmp_path / "a")
    write_samples(tmp_path / "b", n=2)
    assert len(list_shards(str(tmp_path / "a" / "*.tar"))) == 3
    assert len(list_shards(str(tmp_path / "a" / "tokens-{000000..000001}.tar"))) == 2
    assert len(list_shards(f"{tmp_path / 'a'}::{tmp_path / 'b'}")) == 4


def test_read_manifest_checks_format(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="t2i_ds.tokens.v1"):
        read_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path / "missing")


def test_shard_members_are_in_sample_order(tmp_path):
    write_samples(tmp_path, n=2, per_shard=2)
    with tarfile.open(list_shards(tmp_path)[0]) as t:
        names = t.getnames()
    assert names == [f"0000{i}.{m}" for i in range(2) for m in ("codes.npy", "ids.npy", "txt", "json")]
