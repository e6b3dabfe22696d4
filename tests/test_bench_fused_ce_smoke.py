"""The fused-CE benchmark script still runs: its --smoke mode (tiny shapes, CPU, Triton interpreter) in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIELDS = {"device", "torch", "triton", "cuda", "git_commit", "date_utc", "b", "N", "H", "V", "dtype", "impl",
          "fwd_ms", "bwd_ms", "total_ms", "tflops_total", "peak_mib", "max_abs_diff_vs_eager", "error"}


def test_bench_fused_ce_smoke(tmp_path):
    out = tmp_path / "fused_ce.jsonl"
    # A fresh process: TRITON_INTERPRET must be set before triton is imported; CUDA_VISIBLE_DEVICES="" keeps
    # the smoke run on the CPU path on a GPU machine too.
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_fused_ce.py"), "--smoke",
                           "--impls", "eager", "chunked", "triton", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    print(proc.stdout, proc.stderr[-3000:])
    assert proc.returncode == 0

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 * 3, "two batch sizes x three implementations"
    assert {r["impl"] for r in rows} == {"eager", "chunked", "triton"}
    for r in rows:
        assert FIELDS <= r.keys(), f"missing fields: {FIELDS - r.keys()}"
        assert r["error"] is None, r["error"]
        assert r["smoke"] is True and r["device"] == "cpu" and r["N"] == 24 * r["b"]
        assert 0 < r["fwd_ms"] and 0 < r["bwd_ms"] and 0 < r["total_ms"] and r["tflops_total"] > 0
        assert r["max_abs_diff_vs_eager"] < 1e-4, "every timed implementation computes the same loss"
    assert "| b | N | impl |" in proc.stdout, "markdown table printed"
