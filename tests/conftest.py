"""Shared test set-up: CPU by default, GPU tests behind `requires_cuda`, Triton in interpreter mode.

No CUDA query happens at import time of project code; only here, once, for markers.
"""

import os
import time
from pathlib import Path

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must be set
# before triton is imported anywhere in the test process.
try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _HAS_CUDA else os.environ.get("DS_ACCELERATOR", "cuda"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under xdist the workers fill the cores (make test: two workers, two cores): one intra-op thread each, for the torch
# work of the tests and of the processes they start, as the training ranks already run (tests/trainer_utils.env).
# Two threads per worker oversubscribed the cores, and OpenMP's idle threads spin.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) >= 2:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "_torch" in globals():
        _torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# DeepSpeed JIT-builds its CPU communication op: keep the build cache inside this virtual environment, so two
# environments never rebuild (or wait on) each other's op, and build with this environment's ninja (jit_cache).
from t2i_ds.trainer.jit_cache import use_own_cache  # noqa: E402

use_own_cache()

import pytest  # noqa: E402

NEOX_BPE = Path(__file__).resolve().parents[1] / "t2i_ds" / "assets" / "neox-20b-bpe.json"  # shipped with provenance note


MULTINODE_ALL = "T2I_DS_MULTINODE_ALL"  # =1 runs the opt-in multi-node launches (tests/test_multinode.py says which)


def pytest_configure(config):
    # registered here, not in pyproject.toml: the venv's stamp depends on pyproject (a change rebuilds it)
    config.addinivalue_line("markers", f"multinode_all: the further multi-node launches of tests/test_multinode.py "
                                       f"(resume on the surviving node, launcher misuse, the master node lost); {MULTINODE_ALL}=1")


# `make test` spreads the suite over two pytest-xdist workers (`--dist loadscope`, with the scheduler below): a
# module's tests stay on one worker, so its module-scoped runs are made once, and the modules that read the session's
# shared debug-model runs (the `debug_run` fixture) share one worker, so each of those DeepSpeed launches happens once
# per suite. (Not xdist's `loadgroup` with `xdist_group` marks: with pytest 9.2 its node-id suffix is ignored and
# every test is scheduled alone, so module fixtures ran once per worker.)
DEBUG_RUN_GROUP = "debug_runs"
DEBUG_RUN_MODULES = ("test_export", "test_multinode", "test_train")  # checked at collection, below
# The units sent first, longest first, so that the two workers end together: in collection order (or xdist's own
# order, by number of tests) the 70-s demo started last and one worker idled for 100 s. CPU-s measured in a fresh
# clone (commit 547152c + bytecode): debug_runs 210, world_size 81, demo 114, gpu_job 100, compile_check 60,
# compare_init 40, environment 34, run_safety 34, compile 24, docs 22, cli 20; the other units 1-15 s. Only the
# suite's wall time depends on this list.
LONGEST_FIRST = (DEBUG_RUN_GROUP, "test_world_size", "test_demo", "test_gpu_job", "test_compile_check",
                 "test_compare_init", "test_environment", "test_run_safety", "test_image_tokenizers", "test_compile",
                 "test_docs", "test_cli")


def _group(nodeid: str) -> str:
    """tests/test_x.py::test_y[p] -> the scheduling unit: the module, or DEBUG_RUN_GROUP for the debug-run readers."""
    module = nodeid.split("::", 1)[0]
    return DEBUG_RUN_GROUP if Path(module).stem in DEBUG_RUN_MODULES else module


def _send_order(nodeid: str) -> int:
    """The position of the test's unit in LONGEST_FIRST; the units not listed after them, in collection order."""
    unit = Path(_group(nodeid)).stem
    return LONGEST_FIRST.index(unit) if unit in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # units go out in collection order, which pytest_collection_modifyitems set

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ModuleScheduling(config, log)


def _uses_debug_runs(item) -> bool:
    return "debug_run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_multinode = pytest.mark.skip(reason=f"opt-in multi-node launch: set {MULTINODE_ALL}=1")
    strays = sorted({item.module.__name__ for item in items if _uses_debug_runs(item)} - set(DEBUG_RUN_MODULES))
    if strays:  # else these modules would train the debug runs a second time, on the other worker
        raise pytest.UsageError(f"tests/conftest.py: add {strays} to DEBUG_RUN_MODULES (they use the debug_run fixture)")
    items.sort(key=lambda item: _send_order(item.nodeid))  # stable: a module's tests keep their order
    for item in items:
        if "requires_cuda" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_cuda)
        if "multinode_all" in item.keywords and os.environ.get(MULTINODE_ALL) != "1":
            item.add_marker(skip_multinode)


SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer_"  # DeepSpeed's CPU all-reduce workspace, one per rank (trainer.py)


def _ds_shm_segments() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except OSError:  # no /dev/shm here
        return set()


def _mapped_by_a_live_process(names: set[str]) -> set[str]:
    """The names among `names` that some running process still maps (a run under way: another xdist worker's, or
    another suite's on this machine, between DeepSpeed's init and its unlink); the rest nothing can free any more."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended meanwhile, or is not ours to read
            continue
        mapped |= {n for n in names if f"{SHM_DIR}/{n}" in text}
    return mapped


@pytest.fixture(autouse=True)
def no_shared_memory_left_behind():
    """Fail the test after which a DeepSpeed CPU workspace is still in /dev/shm: each is ~69 MB of RAM that
    nothing frees until reboot, and a day of them filled the machine (trainer.release_shm_workspace)."""
    before = _ds_shm_segments()
    yield
    left = _ds_shm_segments() - before
    if left:  # a run under way elsewhere may be between its DeepSpeed init and its unlink: look again
        time.sleep(2)
        left = _ds_shm_segments() - before
        left -= _mapped_by_a_live_process(left)
    for name in left:  # removed, so that later tests are not blamed for this one
        Path(SHM_DIR, name).unlink(missing_ok=True)
    if left:
        pytest.fail(f"left {len(left)} DeepSpeed shared-memory workspace(s) in {SHM_DIR}: {sorted(left)}")


@pytest.fixture(scope="session")
def neox_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(NEOX_BPE))


@pytest.fixture(scope="session")
def debug_run(tmp_path_factory):
    """`debug_run(name)` -> the run directory of tests.trainer_utils.DEBUG_RUNS[name], trained on first use and
    shared by every test module of the session (each run is a DeepSpeed launch of 10-40 s)."""
    from tests.trainer_utils import train_debug_run

    root = tmp_path_factory.mktemp("debug_runs")
    done: dict = {}

    def get(name: str):
        if name not in done:
            done[name] = train_debug_run(name, root / name)
        return done[name]

    return get
