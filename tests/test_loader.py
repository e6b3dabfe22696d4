"""TokenLoader: sequence layout, world-size-independent order, exact resume, broken records, text mixing."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from t2i_ds.data.config import DataConfig
from t2i_ds.data.loader import BrokenDataError, TokenLoader, index_shard
from t2i_ds.data.shards import ShardSample, write_shard
from t2i_ds.vocab import IGNORE, tiny_vocab

VOCAB = tiny_vocab()  # 300 text ids, 64 codes, 16 tokens per image, seq_len 40 -> 18 caption tokens


def sample(i: int, caption_len: int | None = None) -> ShardSample:
    """Sample i: codes start with (i % 64, i // 64) so a row tells which sample it holds."""
    codes = np.full(16, 7)
    codes[:2] = (i % 64, i // 64)
    n = caption_len if caption_len is not None else i % 25
    return ShardSample(f"{i:06d}", codes, (np.arange(n) * 11 + i) % 300, f"c{i}", {"width": 8, "height": 8})


def make_shards(path, n_samples=120, per_shard=10):
    for s in range(0, n_samples, per_shard):
        write_shard(path / f"tokens-{s // per_shard:06d}.tar", [sample(i) for i in range(s, min(s + per_shard, n_samples))])
    return path


def sample_id(row: torch.Tensor) -> int:
    """Which sample an image row holds (-1 for a text-only row)."""
    pos = (row == VOCAB.image).nonzero()
    if len(pos) == 0:
        return -1
    c0, c1 = (row[pos[0, 0] + 1 : pos[0, 0] + 3] - VOCAB.image_offset).tolist()
    return c0 + 64 * c1


def ids_of(batches) -> list[int]:
    return [sample_id(r) for b in batches for r in b["input_ids"]]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("tok"))


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"num_workers": 0, "seed": 3, **kw})


def test_batch_layout_t2i(shards):
    batch = next(TokenLoader(cfg(shards), VOCAB, micro_batch=4))
    x, y = batch["input_ids"], batch["targets"]
    assert x.shape == y.shape == (4, 40) and x.dtype == y.dtype == torch.int64
    for row, tgt in zip(x, y):
        i = sample_id(row)
        n = min(i % 25, VOCAB.max_caption_tokens)
        caption = ((torch.arange(i % 25) * 11 + i) % 300)[:n].tolist()
        codes = [i % 64, i // 64] + [7] * 14
        expect = [VOCAB.doc, VOCAB.text, *caption, VOCAB.text_end, VOCAB.image,
                  *[VOCAB.image_offset + c for c in codes], VOCAB.image_end, VOCAB.doc_end]
        assert row[: len(expect)].tolist() == expect
        assert (row[len(expect) :] == VOCAB.pad_id).all()
        assert tgt[: len(expect) - 1].tolist() == expect[1:] and (tgt[len(expect) - 1 :] == IGNORE).all()


def test_unconditional_and_caption_dropout(shards):
    row = next(TokenLoader(cfg(shards, mode="unconditional"), VOCAB, micro_batch=2))["input_ids"][0]
    assert row[:2].tolist() == [VOCAB.doc, VOCAB.image] and VOCAB.text not in row.tolist()
    rows = next(TokenLoader(cfg(shards, caption_dropout=1.0), VOCAB, micro_batch=3))["input_ids"]
    assert (rows[:, :4] == torch.tensor([VOCAB.doc, VOCAB.text, VOCAB.text_end, VOCAB.image])).all()
    loader = TokenLoader(cfg(shards, caption_dropout=0.5), VOCAB, micro_batch=8)
    [next(loader) for _ in range(10)]
    assert 20 < loader.stats["caption_dropped"] < 60  # 80 draws at p = 0.5


def test_epoch_covers_every_sample_once_and_reshuffles(shards):
    loader = TokenLoader(cfg(shards), VOCAB, micro_batch=10)
    seen = ids_of([next(loader) for _ in range(24)])  # two epochs of 120
    assert sorted(seen[:120]) == list(range(120)) and sorted(seen[120:]) == list(range(120))
    assert seen[:120] != seen[120:] and seen[:120] != list(range(120))


def global_batches(path, steps, micro_batch, grad_accum, world_size, **kw):
    """Sample ids of each global step, gathered from every rank's loader (rank-major, micro-step order)."""
    loaders = [TokenLoader(cfg(path, **kw), VOCAB, micro_batch, rank=r, world_size=world_size, grad_accum=grad_accum)
               for r in range(world_size)]
    out = []
    for _ in range(steps):
        out.append([i for ld in loaders for _ in range(grad_accum) for i in ids_of([next(ld)])])
    return out


@pytest.mark.parametrize("world_size,grad_accum,micro_batch,workers", [(2, 1, 6, 0), (1, 2, 6, 2), (3, 2, 2, 2), (4, 3, 1, 0)])
def test_global_batches_do_not_depend_on_ranks_workers_or_split(shards, world_size, grad_accum, micro_batch, workers):
    """Global batch t (12 rows) holds the same samples in the same order at any world size, worker count and
    micro-batch split; over an epoch every sample appears once."""
    ref = global_batches(shards, 12, 12, 1, 1)
    got = global_batches(shards, 12, micro_batch, grad_accum, world_size, num_workers=workers)
    assert got == ref
    assert sorted(sum(ref[:10], [])) == list(range(120))  # 10 steps x 12 = one epoch


def test_shuffle_windows_mix_shards_and_bound_memory(shards):
    """Window of 3 shards: every window's 30 samples come from exactly 3 shards, in a shuffled order."""
    loader = TokenLoader(cfg(shards, shuffle_window=3), VOCAB, micro_batch=30)
    seen = ids_of([next(loader) for _ in range(4)])
    for w in range(4):
        window = seen[30 * w : 30 * (w + 1)]
        assert len({i // 10 for i in window}) == 3 and window != sorted(window)
    assert sorted(seen) == list(range(120))


def test_tar_index_matches_the_shard(shards):
    idx = index_shard(str(shards / "tokens-000003.tar"))
    assert idx.shape == (10, 2) and (np.diff(idx[:, 0]) > 0).all() and (idx[:, 1] > idx[:, 0]).all()


def run_resume(path, steps_before, steps_after, micro_batch=4, vocab=VOCAB, **kw):
    ref_loader = TokenLoader(cfg(path, **kw), vocab, micro_batch)
    ref = [next(ref_loader) for _ in range(steps_before + steps_after)]
    first = TokenLoader(cfg(path, **kw), vocab, micro_batch)
    before = [next(first) for _ in range(steps_before)]
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = TokenLoader(cfg(path, **kw), vocab, micro_batch)
    resumed.load_state_dict(state)
    after = [next(resumed) for _ in range(steps_after)]
    return ref, before, after


def test_resume_is_exact_in_process(shards):
    # 37 batches of 4 = 148 samples: stops inside epoch 1, resumes across the next epoch boundary.
    ref, before, after = run_resume(shards, 37, 60)
    for a, b in zip(ref, before + after):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["targets"], b["targets"])


def test_resume_with_workers_is_exact(shards):
    ref, before, after = run_resume(shards, 13, 20, num_workers=2)
    assert ids_of(before + after) == ids_of(ref)


def test_resume_with_text_mixing_and_dropout(shards, tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(9)))
    vocab = tiny_vocab(text_size=50_432, real_text_size=50_277)  # room for the NeoX ids of the text file
    ref, before, after = run_resume(shards, 23, 40, vocab=vocab, text_mix_ratio=0.3, text_path=str(text), caption_dropout=0.2)
    for a, b in zip(ref, before + after):
        assert torch.equal(a["input_ids"], b["input_ids"])
    rows = torch.cat([b["input_ids"] for b in ref])
    text_rows = rows[(rows == vocab.image).sum(1) == 0]
    assert 0.15 < len(text_rows) / len(rows) < 0.45
    assert (text_rows[:, :2] == torch.tensor([vocab.doc, vocab.text])).all()
    from t2i_ds.data.tokenizers import TextTokenizer

    docs = {tuple(TextTokenizer().encode(f"document number {i}")) for i in range(9)}
    for row in text_rows:  # <doc> <text> ids </text> </doc>
        end = (row == vocab.text_end).nonzero()[0, 0]
        assert tuple(row[2:end].tolist()) in docs


def rows_of(loaders, steps, grad_accum):
    """Input rows of each global step from every rank's loader, concatenated rank-major."""
    return [torch.cat([next(ld)["input_ids"] for ld in loaders for _ in range(grad_accum)]) for _ in range(steps)]


@pytest.mark.parametrize("before,after", [((2, 1), (1, 2)), ((1, 2), (2, 1)), ((1, 2), (4, 1))])
def test_resume_at_another_world_size_continues_the_global_order(shards, tmp_path, before, after):
    """(world_size, grad_accum) before and after the checkpoint, global batch 8 rows: the steps after the resume
    equal an uninterrupted run's, text mixing and caption dropout included."""
    text = tmp_path / "t.txt"
    text.write_text("\n".join(f"document number {i}" for i in range(7)))
    vocab = tiny_vocab(text_size=50_432, real_text_size=50_277)
    kw = dict(text_mix_ratio=0.25, text_path=str(text), caption_dropout=0.3, shuffle_window=5)

    def loaders(world, accum):
        return [TokenLoader(cfg(shards, **kw), vocab, 8 // (world * accum), r, world, grad_accum=accum) for r in range(world)]

    ref = rows_of(loaders(1, 1), 30, 1)
    first = loaders(*before)
    head = rows_of(first, 17, before[1])
    states = [json.loads(json.dumps(ld.state_dict())) for ld in first]
    assert all(st["position"] == 17 * 8 and st["micro"] == 0 for st in states)  # global: the same on every rank
    resumed = loaders(*after)
    for ld in resumed:
        ld.load_state_dict(states[0])
    tail = rows_of(resumed, 13, after[1])
    for a, b in zip(ref, head + tail):
        assert torch.equal(a, b)


def test_mid_step_state_with_another_split_restarts_the_step(shards):
    first = TokenLoader(cfg(shards), VOCAB, micro_batch=2, grad_accum=2)
    [next(first) for _ in range(5)]  # step 2, one micro-batch in
    assert (first.state_dict()["position"], first.state_dict()["micro"]) == (8, 1)
    other = TokenLoader(cfg(shards), VOCAB, micro_batch=4)
    with pytest.warns(UserWarning, match="restarting that step at global position 8"):
        other.load_state_dict(first.state_dict())
    ref = TokenLoader(cfg(shards), VOCAB, micro_batch=4)
    assert ids_of([next(other)]) == ids_of([next(ref) for _ in range(3)][-1:])  # rows 8-11


def test_sample_keys_of_each_batch(shards):
    loader = TokenLoader(cfg(shards), VOCAB, micro_batch=3)
    batch = next(loader)
    assert [int(k) for k in loader.last_keys] == ids_of([batch])


# ---- broken records --------------------------------------------------------------------------------
def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_tar(path, members: list[tuple[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def good_members(key, i):
    s = sample(i)
    return [(f"{key}.codes.npy", npy(s.codes.astype(np.uint16))), (f"{key}.ids.npy", npy(s.caption_ids.astype(np.int32))),
            (f"{key}.txt", b"c"), (f"{key}.json", b"{}")]


def broken_shard(path):
    good = [m for i in range(20) for m in good_members(f"g{i:03d}", i)]
    bad = {
        "truncated_codes": [("b1.codes.npy", npy(np.zeros(15, np.uint16)))],
        "wrong_dtype": [("b2.codes.npy", npy(np.zeros(16, np.int64)))],
        "codes_out_of_range": [("b3.codes.npy", npy(np.full(16, 64, np.uint16)))],
        "bad_codes": [("b4.codes.npy", b"\x93NUMPY garbage")],  # corrupt member
    }
    members = good[:]
    for key, m in bad.items():
        members += m + [(m[0][0].split(".")[0] + ".ids.npy", npy(np.zeros(2, np.int32))), (m[0][0].split(".")[0] + ".json", b"{}")]
    members += [("b5.codes.npy", npy(np.zeros(16, np.uint16))), ("b5.ids.npy", npy(np.array([300], np.int32))), ("b5.json", b"{}")]
    members += [("b6.codes.npy", npy(np.zeros(16, np.uint16))), ("b6.ids.npy", npy(np.array([1], np.int32))), ("b6.json", b"{nope")]
    members += [("b7.codes.npy", npy(np.zeros(16, np.uint16))), ("b7.ids.npy", npy(np.array([1.0])))]  # float ids, no json
    write_tar(path, members)


def test_broken_records_are_skipped_and_counted(tmp_path):
    broken_shard(tmp_path / "tokens-000000.tar")
    data = (tmp_path / "tokens-000001.tar")
    write_shard(data, [sample(i) for i in range(100, 140)])
    raw = bytearray((tmp_path / "tokens-000000.tar").read_bytes())
    raw[40 * 1024 : 40 * 1024 + 512] = b"\x07" * 512  # garbage tar header (members here take 1,024 bytes)
    (tmp_path / "tokens-000002.tar").write_bytes(bytes(raw))
    write_shard(tmp_path / "x-000000.tar", [sample(i) for i in range(200, 230)])
    raw = bytearray((tmp_path / "x-000000.tar").read_bytes())
    raw[40 * 1024 : 40 * 1024 + 512] = b"\x07" * 512  # tarfile stops silently: the sidecar count tells
    (tmp_path / "tokens-000003.tar").write_bytes(bytes(raw))
    (tmp_path / "x-000000.stats.json").rename(tmp_path / "tokens-000003.stats.json")
    (tmp_path / "x-000000.tar").unlink()
    loader = TokenLoader(cfg(tmp_path, max_broken_fraction=1.0), VOCAB, micro_batch=4)
    batches = [next(loader) for _ in range(40)]
    got = ids_of(batches)
    assert set(got) - {-1} <= set(range(20)) | set(range(100, 140)) | set(range(200, 210))
    stats = loader.stats
    # a broken record leaves an all-pad row without targets in its place: later rows do not shift
    empty = [(b["input_ids"][i] == VOCAB.pad_id).all() and (b["targets"][i] == IGNORE).all() for b in batches for i in range(4)]
    assert sum(empty) == got.count(-1) == sum(v for k, v in stats.items() if k.startswith("broken:")) > 0
    for reason in ("truncated_codes", "wrong_dtype", "codes_out_of_range", "bad_codes", "ids_out_of_range", "bad_json",
                   "missing_member", "corrupt_tar"):
        assert stats[f"broken:{reason}"] > 0, (reason, dict(stats))


def test_broken_fraction_raises_naming_the_shard(tmp_path):
    broken_shard(tmp_path / "tokens-000000.tar")
    loader = TokenLoader(cfg(tmp_path, min_records_for_broken_check=10), VOCAB, micro_batch=4)
    with pytest.raises(BrokenDataError, match="tokens-000000.tar"):
        [next(loader) for _ in range(10)]


def test_empty_dir_and_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        TokenLoader(cfg(tmp_path), VOCAB, micro_batch=2)
    with pytest.raises(ValueError, match="mode"):
        DataConfig(path="x", mode="video")
    with pytest.raises(ValueError, match="text_path"):
        DataConfig(path="x", text_mix_ratio=0.1)
    with pytest.raises(ValueError, match="caption_dropout"):
        DataConfig(path="x", caption_dropout=1.5)
    with pytest.raises(ValueError, match="path"):
        DataConfig()
