# Two commands do all the work on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment first, from the lock files in requirements/ (every package at an exact
# version, with hashes; CPU torch, so no CUDA build is downloaded). `make lock` regenerates the locks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCKS := requirements/uv.lock requirements/bootstrap.lock requirements/cpu.lock requirements/nodeps.lock
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-built ops live inside the environment: venvs never rebuild or lock each other's
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
# where the CPU torch wheel is found: this machine's disk, or PyTorch's CPU index elsewhere
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
# uv installs (pip took ~4x as long: serial downloads); no package comes from anywhere but a lock, every one checked
# against its hash. --compile-bytecode: the .pyc files are written here, once, in parallel. Without them every
# process recompiles what it imports wherever PYTHONDONTWRITEBYTECODE is set (as on CI's machines): `import deepspeed`
# took 5.7 CPU-s instead of 1.9, and `make test` (hundreds of processes) 15 min 50 s instead of 8 min 42 s.
UV_INSTALL = $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) --no-deps $(TORCH_SOURCE)

.PHONY: venv test demo bench lock test-latest clean

venv: $(STAMP)

# --clear: a lock change rebuilds the venv from nothing, so nothing the lock no longer names survives.
# Pass 0: pip installs uv (requirements/uv.lock). Then uv: pass 1 the installers and torch; pass 2 the rest
# (DeepSpeed builds from source against that torch, hence --no-build-isolation); pass 3 the project itself
# (editable, no dependencies of its own: the locks hold them all); pass 4 clean-fid outside site-packages
# (requirements/nodeps.in says why). `pip check` last.
$(STAMP): pyproject.toml $(LOCKS)
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements/uv.lock
	$(UV_INSTALL) --require-hashes -r requirements/bootstrap.lock
	$(UV_INSTALL) --require-hashes --no-build-isolation -r requirements/cpu.lock
	$(UV_INSTALL) --no-build-isolation -e .
	$(UV_INSTALL) --require-hashes --target $(VENV)/nodeps -r requirements/nodeps.lock
	$(PY) -m pip check
	touch $(STAMP)

# tests/conftest.py picks the CPU accelerator and the Triton interpreter when there is no GPU, and groups the tests
# for pytest-xdist (a module per worker; the modules sharing the debug-model runs together). Two workers fill two
# cores: the DeepSpeed launches wait on process start-up and rendezvous, the Triton interpreter on one core.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope tests

# the demo uses all GPUs when there are any, else 2 CPU ranks (gloo)
demo: $(STAMP)
	$(PY) -m t2i_ds.demo --out runs/demo

bench: $(STAMP)
	$(PY) benchmarks/bench_fused_ce.py
	$(PY) benchmarks/bench_attention.py

# Regenerate the locks with uv (the version requirements/uv.in pins, in its own venv). Versions already locked are
# kept where they still resolve; `make lock LOCK_FLAGS=--upgrade` moves everything to the newest release pyproject's
# ranges allow.
LOCK_VENV ?= .venv-lock
UV_COMPILE = $(LOCK_VENV)/bin/uv pip compile -q --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 $(TORCH_SOURCE) --custom-compile-command "make lock" $(LOCK_FLAGS)

lock:
	test -x $(LOCK_VENV)/bin/uv || { $(PYTHON) -m venv $(LOCK_VENV) && $(LOCK_VENV)/bin/pip install -q -r requirements/uv.in; }
	$(UV_COMPILE) requirements/uv.in -o requirements/uv.lock
	$(UV_COMPILE) pyproject.toml requirements/cpu.in --extra test -o requirements/cpu.lock
	$(UV_COMPILE) requirements/bootstrap.in -c requirements/cpu.lock -o requirements/bootstrap.lock
	$(UV_COMPILE) requirements/nodeps.in --no-deps -o requirements/nodeps.lock
	# a CUDA machine's pins: cpu.lock without torch and triton, which come with the CUDA build (README)
	$(UV_COMPILE) pyproject.toml requirements/cpu.in --extra test -c requirements/cpu.lock \
		--no-emit-package torch --no-emit-package triton -o requirements/gpu.lock

# The drift check (not part of `make test` or CI): a second venv from pyproject's ranges alone, newest releases
# resolved by the locked uv, the CPU torch wheel the one exception (installed first: DeepSpeed builds against it);
# the project last, by itself, as `make venv` does (PyPI's `kernels` hooks setuptools' egg_info and imports
# huggingface_hub: building the project while uv was still installing that failed); then the suite as `make test`
# runs it, less the test that holds the venv to the lock.
LATEST_VENV ?= .venv-latest
LATEST_PY := $(LATEST_VENV)/bin/python
LATEST_INSTALL = $(LATEST_VENV)/bin/uv pip install -q --compile-bytecode --python $(LATEST_PY) $(TORCH_SOURCE)
LATEST_TORCH = "torch==$$(sed -n 's/^torch==\([^ ]*\).*/\1/p' requirements/cpu.lock)"
test-latest:
	$(PYTHON) -m venv --clear $(LATEST_VENV)
	$(LATEST_PY) -m pip install -q --no-deps --require-hashes -r requirements/uv.lock
	$(LATEST_INSTALL) --upgrade pip setuptools wheel $(LATEST_TORCH)
	$(LATEST_INSTALL) --no-build-isolation -r pyproject.toml --extra test $(LATEST_TORCH)
	$(LATEST_INSTALL) --no-build-isolation --no-deps -e .
	$(LATEST_INSTALL) --no-deps --target $(LATEST_VENV)/nodeps clean-fid
	$(LATEST_PY) -m pip check
	TORCH_EXTENSIONS_DIR=$(abspath $(LATEST_VENV))/torch_extensions $(LATEST_PY) -m pytest -q -n $(TEST_WORKERS) \
		--dist loadscope tests --deselect tests/test_environment.py::test_venv_matches_the_locks

clean:
	rm -rf $(VENV) $(LOCK_VENV) $(LATEST_VENV) runs .pytest_cache
