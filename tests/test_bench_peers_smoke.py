"""benchmarks/bench_peers.py --smoke in-process: every part runs and records rows with the environment and load."""

import importlib.util
import json

from tests.trainer_utils import ROOT


def test_bench_peers_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "benchmarks" / "bench_peers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "peers.jsonl"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for r in rows:
        for key in ("date", "commit", "torch", "transformers", "device", "dtype", "threads"):
            assert key in r, key
    gen = [r for r in rows if r["bench"] == "peers_generate"]
    assert {r["contestant"] for r in gen} == {"t2i_ds", "hf_guidance", "hf_doubled"}
    assert all(r["codes_equal"] and r["images_per_s"] > 0 and r["gflop"] > 0 and r["share_of_same_shape"] > 0 for r in gen)
    assert all("load1_before" in r for r in gen)
    train = {r["contestant"]: r for r in rows if r["bench"] == "peers_train"}
    assert train["plain"]["tokens_per_s"] > 0 and train["plain"]["gflop_per_step"] > 0
    hf = train["hf_trainer"]  # transformers' Trainer on the exported model (accelerate is in the test extra)
    assert "skipped" not in hf, hf.get("skipped")
    assert hf["tokens_per_s"] > 0 and hf["gflop_per_step"] > 0 and hf["share_of_same_shape"] > 0
    load = {(r["contestant"], r["layers"]) for r in rows if r["bench"] == "peers_load"}
    assert {("t2i_ds", 2), ("hf_from_pretrained", 2), ("t2i_ds_before", 2)} <= load
    assert {r["threads"] for r in rows if r["bench"] == "peers_limit"} >= {1}
    assert "| smoke | 2 | 16 |" in capsys.readouterr().out
