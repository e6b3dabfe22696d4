"""benchmarks/gpu_job.sh --dry-run: the GPU job's stages, on the CPU at tiny shapes, so the job cannot rot.

The dry run runs the same commands as the job on a lent GPU (the requires_cuda tests, the fused-CE benchmark, the
training benchmark, the attention benchmark, the comparison with the peers), each benchmark in its --smoke mode (Triton interpreter, tiny fp32
shapes; its timings mean nothing). Checked here: every stage passes, $OUT holds at most 8 files (the device
tool's limit), the rows carry the stamped commit, and each benchmark writes well-formed rows. This test replaces
the three per-script smoke tests, which ran the same scripts.
"""

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAMP = "0123456789abcdef0123456789abcdef01234567-test"
STAGES = ["tests", "fused_ce", "train", "attention", "peers"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_job")
    stamp = out.parent / "REVISION"
    stamp.write_text(STAMP + "\n")  # as `gpu_job.sh --stamp` writes it before the tree is copied
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "REVISION_FILE": str(stamp),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "T2I_GIT_REVISION"):
        env.pop(k, None)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_job.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    log = (out / "job.log").read_text() if (out / "job.log").exists() else ""
    return proc.returncode, out, log


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_stage_passes_and_out_fits_the_device_limits(dry_run):
    rc, out, log = dry_run
    stages = _rows(out / "stages.jsonl")
    assert [s["stage"] for s in stages] == STAGES, log[-3000:]
    failed = [s for s in stages if s["rc"] != 0]
    assert rc == 0 and not failed, (failed, log[-5000:])
    assert all(s["mode"] == "dry" and s["commit"] == STAMP for s in stages)
    assert sum(s["limit_s"] for s in stages) + 45 <= 9 * 60, "the stage limits (and install) fit in 9 minutes"
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["attention.jsonl", "fused_ce.jsonl", "job.log", "junit.xml", "peers.jsonl", "stages.jsonl",
                     "train.jsonl"]
    assert len(files) <= 8


@pytest.mark.slow
def test_cuda_tests_are_collected_and_skip_on_cpu(dry_run):
    _, out, _ = dry_run
    suite = ET.parse(out / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert int(suite.get("tests")) >= 10 and int(suite.get("skipped")) == int(suite.get("tests"))
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0


FCE_FIELDS = {"device", "torch", "triton", "cuda", "git_commit", "date_utc", "b", "N", "H", "V", "dtype", "impl",
              "fwd_ms", "bwd_ms", "total_ms", "tflops_total", "peak_mib", "max_abs_diff_vs_eager", "error"}


@pytest.mark.slow
def test_fused_ce_rows(dry_run):
    _, out, _ = dry_run
    rows = _rows(out / "fused_ce.jsonl")
    impls = {r["impl"] for r in rows}
    assert {"sum_triton", "triton", "eager", "torch_lce"} <= impls, impls   # liger/cce absent here: skipped
    for r in rows:
        assert FCE_FIELDS <= r.keys(), f"missing fields: {FCE_FIELDS - r.keys()}"
        assert r["error"] is None, r["error"]
        assert r["smoke"] is True and r["device"] == "cpu" and r["N"] == 24 * r["b"]
        assert r["git_commit"] == STAMP
        assert 0 < r["fwd_ms"] and 0 < r["bwd_ms"] and 0 < r["total_ms"] and r["tflops_total"] > 0
        assert r["max_abs_diff_vs_eager"] < 1e-4, "every timed implementation computes the same loss"


@pytest.mark.slow
def test_train_row(dry_run):
    _, out, _ = dry_run
    (row,) = _rows(out / "train.jsonl")
    for key in ("date", "commit", "torch", "device", "model", "flops_per_token", "perf/tokens_per_s_per_device",
                "loss/total"):
        assert key in row, key
    assert row["model"] == "debug" and row["perf/tokens_per_s_per_device"] > 0 and row["commit"] == STAMP


ATTN_FIELDS = {"device", "torch", "triton", "cuda", "git_commit", "git_dirty", "date_utc", "bench", "shape", "dtype",
               "backend", "mode", "ms", "ms_p20", "ms_p80", "smoke"}


@pytest.mark.slow
def test_attention_rows(dry_run):
    _, out, _ = dry_run
    rows = _rows(out / "attention.jsonl")
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    attention = [r for r in rows if r["bench"] == "attention"]
    backends = {r["backend"] for r in attention}
    assert {"sdpa", "triton", "eager"} <= backends
    for r in attention:
        assert ATTN_FIELDS | {"tflops", "causal"} <= r.keys(), r.keys()
        assert r["device"] == "cpu" and r["smoke"] is True and r["causal"] is True and r["git_commit"] == STAMP
        assert set(r["shape"]) == {"B", "S", "H", "D"} and r["ms"] > 0 and r["tflops"] > 0
    modes = {(r["shape"]["B"], r["backend"], r["mode"]) for r in attention}
    assert len(modes) == len(attention) == 3 * len(backends) * len({r["shape"]["B"] for r in attention})
    elementwise = [r for r in rows if r["bench"] != "attention"]
    assert {r["bench"] for r in elementwise} == {"layer_norm", "rotary", "swiglu"}
    assert {r["backend"] for r in elementwise} == {"triton", "torch"}  # torch.compile is skipped in smoke mode
    for r in elementwise:
        assert ATTN_FIELDS | {"gbps"} <= r.keys() and r["mode"] in ("fwd", "bwd") and r["gbps"] > 0


@pytest.mark.slow
def test_peers_rows(dry_run):
    """The peers stage: the limit, generation (t2i_ds vs both transformers forms) and the training step (the plain
    loop and the HF Trainer; the DeepSpeed launch is not part of --smoke), each row with the stamped commit."""
    _, out, _ = dry_run
    rows = _rows(out / "peers.jsonl")
    assert {r["bench"] for r in rows} == {"peers_limit", "peers_generate", "peers_train"}
    assert all(r["commit"] == STAMP and r["dtype"] == "fp32" and "load1_before" in r for r in rows)
    gen = [r for r in rows if r["bench"] == "peers_generate"]
    assert {r["contestant"] for r in gen} == {"t2i_ds", "hf_guidance", "hf_doubled"}
    assert all(r["codes_equal"] and r["images_per_s"] > 0 for r in gen)
    train = {r["contestant"]: r for r in rows if r["bench"] == "peers_train"}
    assert set(train) == {"plain", "hf_trainer"} and all(r["tokens_per_s"] > 0 for r in train.values())


def test_stamp_writes_the_revision_file(tmp_path):
    """--stamp records HEAD (+ -dirty) in .whl/REVISION; a copy of the tree is stamped from it."""
    env = {**os.environ}
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    head = proc.stdout.strip()
    rev = REPO / ".whl" / "REVISION"
    had_dir = rev.parent.exists()
    before = rev.read_text() if rev.exists() else None
    try:
        out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_job.sh"), "--stamp"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert rev.read_text().strip() in (head, head + "-dirty")
    finally:
        if before is None:
            rev.unlink(missing_ok=True)
            if not had_dir:
                rev.parent.rmdir()
        else:
            rev.write_text(before)
    bad = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_job.sh"), "--bogus"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "usage" in bad.stderr
