"""benchmarks/scale_model.py: the step model's arithmetic (no GPU, no DeepSpeed run)."""

import sys

import pytest

from tests.trainer_utils import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_model  # noqa: E402


@pytest.fixture(scope="module")
def params():
    return scale_model.parameters("open_lm_1b")


def test_paper_step_on_64_a100s(params):
    inp = scale_model.Inputs(sources=dict(scale_model.SOURCES))
    r = scale_model.project(inp, params=params)
    assert r["params"] == 1_507_028_992  # open_lm-1b extended to 66,822 rows
    assert (r["micro_batch"], r["grad_accum"]) == (14, 1) and r["tokens_per_step"] == 14 * 64 * 1152
    assert r["compute_s"] == pytest.approx(r["tokens_per_step"] * r["flops_per_token"] / (64 * 312e12 * inp.mfu))
    # ZeRO-2 ring: all-reduce of P fp32 gradients, all-gather of P bf16 parameters, over 25 GB/s NICs at 80%;
    # latency: 31 buckets of 5e7 elements x ring steps x 5 us
    bw, buckets = 0.8 * 25e9, 31
    assert r["comm_all_reduce_s"] == pytest.approx(2 * 63 / 64 * r["params"] * 4 / bw + buckets * 2 * 63 * 5e-6)
    assert r["comm_all_gather_s"] == pytest.approx(63 / 64 * r["params"] * 2 / bw + buckets * 63 * 5e-6)
    assert r["step_s"] == pytest.approx(r["compute_s"] + max(0.0, r["comm_s"] - inp.overlap * r["compute_s"]))
    assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_step"] / r["step_s"] / 64)
    assert r["days_for_100B"] == pytest.approx(1e11 / (r["tokens_per_step"] / r["step_s"]) / 86400)


def test_crossover_and_inputs_move_it(params):
    base = scale_model.Inputs()
    n, always = scale_model.crossover(base, params)
    assert n is not None and not scale_model.project(base, n, params)["comm_hidden"] and always >= n
    assert scale_model.project(base, 8, params)["comm_hidden"]  # inside one node NVLink hides it
    faster = scale_model.Inputs(grad_bytes=2)  # bf16 gradient communication halves the all-reduce
    assert scale_model.crossover(faster, params)[0] > n
    hidden = scale_model.Inputs(overlap=100.0)
    assert scale_model.project(hidden, 64, params)["exposed_comm_s"] == 0.0


def test_measured_mfu_is_preferred_and_labelled(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"model": "open_lm_1b", "perf/mfu": 0.41, "device": "NVIDIA H200", "date": "d", "commit": "c"}\n'
                    '{"model": "debug", "perf/mfu": 0.9}\n')
    mfu, label = scale_model.measured_mfu(path)
    assert mfu == 0.41 and label.startswith("measured") and "H200" in label
    assert scale_model.measured_mfu(tmp_path / "missing.jsonl") is None
