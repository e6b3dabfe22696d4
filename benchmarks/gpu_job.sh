#!/usr/bin/env bash
# The GPU job: everything a lent H100/H200 should run, as one command that fits one 10-minute device call.
#
#   benchmarks/gpu_job.sh --stamp     # here, before the copy: writes .whl/REVISION (this tree's commit)
#   bash benchmarks/gpu_job.sh        # on the GPU machine, from the repo root, with .whl carried; results in $OUT
#   benchmarks/gpu_job.sh --dry-run   # CPU, tiny shapes, the same stages (tests/test_gpu_job.py, i.e. make test)
#
# Stages, in order of value, each under its own `timeout`; a failing stage never stops the next one:
#   install    the offline wheels that ../shared/gpu/stage.sh put into .whl/ (deepspeed, liger, cce, ...), and this
#              project in editable mode (GPU only)
#   tests      every `requires_cuda` test (JUnit XML)
#   fused_ce   the fused-CE benchmark at b = 8: ours (sum mode, per-token), eager, torch.compile, Liger, CCE, torch's
#              linear_cross_entropy where present
#   train      20 steps of open_lm-1b, bf16, micro-batch 8, no final checkpoint
#   attention  the attention backends and fused elementwise kernels at B = 8
#   peers      benchmarks/bench_peers.py in bf16 on the GPU: the bf16 matmul limit; generation vs transformers
#              generate() (open_lm-1b cut to 2 layers, the paper's 66,822-row vocabulary, batch 8 and 32, CFG);
#              the training step (open_lm-1b's dims cut to 4 layers, sequence 1,152, micro-batch 8) of t2i_ds vs a
#              plain PyTorch loop vs the HF Trainer
# The limits add up to 540 s (9 minutes; each stage gets SIGINT at its limit and SIGKILL 15 s later; none measured on
# a GPU yet). $OUT receives at most 8 files: job.log, stages.jsonl, junit.xml, fused_ce.jsonl, train.jsonl,
# attention.jsonl, peers.jsonl. Exit status: 0 when every stage passed, 1 otherwise.
set -u -o pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
MODE=gpu
case "${1:-}" in
  "") ;;
  --dry-run) MODE=dry ;;
  --stamp)
    rev=$(git rev-parse HEAD) || exit 1
    [ -n "$(git status --porcelain --untracked-files=no)" ] && rev="$rev-dirty"
    mkdir -p .whl && echo "$rev" > .whl/REVISION
    echo "stamped $rev into .whl/REVISION; carry [\".whl\"] (see benchmarks/README.md for the run call)"
    exit 0 ;;
  *) echo "usage: $0 [--dry-run | --stamp]" >&2; exit 2 ;;
esac

OUT=${OUT:-$ROOT/runs/gpu_job}
mkdir -p "$OUT"
LOG=$OUT/job.log
STAGES=$OUT/stages.jsonl
: > "$LOG"
: > "$STAGES"
PY=${PYTHON:-python3}
REVISION_FILE=${REVISION_FILE:-.whl/REVISION}
# The commit: stamped into a file before the tree was copied (the GPU machine's copy has no .git).
T2I_GIT_REVISION=$(cat "$REVISION_FILE" 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)
export T2I_GIT_REVISION PYTHONUNBUFFERED=1

if [ "$MODE" = dry ]; then
  # The same stages on the CPU: no GPU visible, Triton in its interpreter, every benchmark in its --smoke mode.
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  # DeepSpeed's JIT-built CPU op lives in the environment, as `make test` keeps it (never rebuilt per run).
  TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$("$PY" -c 'import sys; print(sys.prefix)')/torch_extensions}
  export TORCH_EXTENSIONS_DIR
  SMOKE=(--smoke)
  TRAIN_ARGS=(--smoke)
  ATTN_ARGS=(--smoke)
  PEERS_ARGS=(--smoke)
else
  SMOKE=()
  TRAIN_ARGS=(--preset open_lm_1b --micro-batch 8 --steps 20 --log-every 5 --skip-windows 1)
  ATTN_ARGS=(--batch 8)
  PEERS_ARGS=(--device cuda --dtype bf16 --models open_lm_1b_2l --batches 8 32 --train-layers 4 --train-repeats 1
    --train-contestants t2i_ds plain hf_trainer)  # t2i_ds: zero0.json, the one-GPU config (70 s: no zero2 row)
fi

stage() {  # stage NAME LIMIT_S COMMAND...: run under `timeout`, log, record rc and seconds; never exit
  local name=$1 limit=$2
  shift 2
  local t0 rc t1
  t0=$(date +%s)
  echo "=== $name (limit ${limit} s): $*" >> "$LOG"
  # SIGINT first: pytest still writes its JUnit XML, the benchmarks keep the rows they appended; KILL 15 s later.
  timeout --signal=INT --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  t1=$(date +%s)
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit_s": %d, "mode": "%s", "commit": "%s"}\n' \
    "$name" "$rc" "$((t1 - t0))" "$limit" "$MODE" "$T2I_GIT_REVISION" >> "$STAGES"
  echo "=== $name: rc=$rc in $((t1 - t0)) s" | tee -a "$LOG"
}

if [ "$MODE" = gpu ]; then
  stage install 45 bash -c 'python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .'
  export PYTHONPATH=/tmp/site:$ROOT
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$LOG" 2>&1
fi

mapfile -t CUDA_TESTS < <(grep -l "requires_cuda" tests/test_*.py)
# Triton's first-launch compiles dominate this stage on a bare machine: spread the tests over processes where
# pytest-xdist is installed (the GPU image has it; the GPU's memory holds the largest tests side by side). Not in the
# dry run, where every test skips: six workers collecting the suite cost `make test` ~20 CPU-s for nothing.
XDIST=()
[ "$MODE" = gpu ] && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 6)
stage tests 130 "$PY" -m pytest -q -p no:cacheprovider -m requires_cuda "${XDIST[@]}" --durations=15 \
  --junitxml="$OUT/junit.xml" "${CUDA_TESTS[@]}"
stage fused_ce 100 "$PY" benchmarks/bench_fused_ce.py "${SMOKE[@]}" --batches 8 --out "$OUT/fused_ce.jsonl" \
  --impls sum_triton triton eager compile liger cce torch_lce torch_lce_chunked
stage train 150 "$PY" benchmarks/bench_train.py "${TRAIN_ARGS[@]}" --out "$OUT/train.jsonl"
stage attention 45 "$PY" benchmarks/bench_attention.py "${ATTN_ARGS[@]}" --out "$OUT/attention.jsonl"
stage peers 70 "$PY" benchmarks/bench_peers.py "${PEERS_ARGS[@]}" --parts limit generate train --threads 1 \
  --out "$OUT/peers.jsonl"

failed=$(grep -vc '"rc": 0,' "$STAGES")
echo "=== done ($MODE, commit $T2I_GIT_REVISION): $failed failed stage(s); results in $OUT" | tee -a "$LOG"
[ "$failed" -eq 0 ]
