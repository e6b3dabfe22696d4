# Two commands do all the work on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment first (CPU torch pinned so no CUDA build is downloaded).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
CLEANFID_PIN ?= clean-fid==0.1.35
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-built ops live inside the environment: venvs never rebuild or lock each other's
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_PIN)"
	# --no-build-isolation: deepspeed builds against the torch installed above, never a fresh CUDA one.
	PIP_CONSTRAINT= $(PY) -m pip install -q --no-build-isolation -e ".[test]" "$(TORCH_PIN)"
	# clean-fid, the FID protocol's reference implementation, for the parity tests (tests/test_cleanfid_parity.py):
	# --no-deps because it requires torchvision, which does not install beside the CPU torch pin; the module the
	# tests use (cleanfid.resize) needs neither.
	$(PY) -m pip install -q --no-deps "$(CLEANFID_PIN)"
	touch $(STAMP)

# tests/conftest.py picks the CPU accelerator and the Triton interpreter when there is no GPU
test: $(STAMP)
	$(PY) -m pytest -q tests

# the demo uses all GPUs when there are any, else 2 CPU ranks (gloo)
demo: $(STAMP)
	$(PY) -m t2i_ds.demo --out runs/demo

bench: $(STAMP)
	$(PY) benchmarks/bench_fused_ce.py
	$(PY) benchmarks/bench_attention.py

clean:
	rm -rf $(VENV) runs .pytest_cache
