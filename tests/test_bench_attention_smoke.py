"""benchmarks/bench_attention.py --smoke runs end to end on the CPU (Triton interpreter) and writes well-formed rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ENV_FIELDS = {"device", "torch", "triton", "cuda", "git_commit", "git_dirty", "date_utc"}
ROW_FIELDS = ENV_FIELDS | {"bench", "shape", "dtype", "backend", "mode", "ms", "ms_p20", "ms_p80", "smoke"}


def test_smoke_run_appends_json_rows(tmp_path):
    out = tmp_path / "attention.jsonl"
    out.write_text('{"previous": "row"}\n')  # rows are appended, never overwritten
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_attention.py"), "--smoke", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| B | S | backend |" in proc.stdout  # the markdown table

    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == {"previous": "row"}
    rows = [json.loads(line) for line in lines[1:]]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]

    attention = [r for r in rows if r["bench"] == "attention"]
    backends = {r["backend"] for r in attention}
    assert {"sdpa", "triton", "eager"} <= backends
    for r in attention:
        assert ROW_FIELDS | {"tflops", "causal"} <= r.keys(), r.keys()
        assert r["device"] == "cpu" and r["smoke"] is True and r["causal"] is True
        assert set(r["shape"]) == {"B", "S", "H", "D"}
        assert r["ms"] > 0 and r["tflops"] > 0
    modes = {(r["shape"]["B"], r["backend"], r["mode"]) for r in attention}
    assert len(modes) == len(attention) == 3 * len(backends) * len({r["shape"]["B"] for r in attention})

    elementwise = [r for r in rows if r["bench"] != "attention"]
    assert {r["bench"] for r in elementwise} == {"layer_norm", "rotary", "swiglu"}
    assert {r["backend"] for r in elementwise} == {"triton", "torch"}  # torch.compile is skipped in smoke mode
    for r in elementwise:
        assert ROW_FIELDS | {"gbps"} <= r.keys() and r["mode"] in ("fwd", "bwd") and r["gbps"] > 0
