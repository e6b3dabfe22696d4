"""benchmarks/bench_generate.py --smoke in-process: fast and baseline loops and the sampling cases, recorded as rows."""

import importlib.util
import json

from tests.trainer_utils import ROOT


def test_bench_generate_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_generate", ROOT / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "generate.jsonl"
    bench.main(["--smoke", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gen = [r for r in rows if r["bench"] == "generate"]
    assert {(r["batch"], r["loop"]) for r in gen} == {(b, loop) for b in (2, 3) for loop in ("fast", "baseline")}
    for r in rows:
        for key in ("date", "commit", "torch", "device", "threads"):
            assert key in r, key
    assert all(r["images_per_s"] > 0 and r["image_tokens"] == 16 for r in gen)
    assert {r["impl"] for r in rows if r["bench"] == "generate_sampling"} == {"torch (baseline)", "op", "reference"}
    assert "| smoke | 16 | 2 (4) |" in capsys.readouterr().out
