"""benchmarks/bench_train.py end to end on CPU (debug model): one JSON row with the recorded fields."""

import json
import subprocess
import sys

import pytest

from tests.trainer_utils import ROOT, env


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    out = tmp_path / "train.jsonl"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    for key in ("date", "commit", "torch", "device", "model", "flops_per_token", "perf/tokens_per_s_per_device", "loss/total"):
        assert key in row, key
    assert row["model"] == "debug" and row["perf/tokens_per_s_per_device"] > 0
    assert "| device | model |" in proc.stdout
