"""The environment the two commands build: the same every day, and whole from any directory.

- `import kernels` is the PyPI package (transformers imports it), never the repository's kernels/ folder, whether
  Python starts in the repository root (where `make test`, CI and README's users stand) or anywhere else;
  diffusers' VQModel and transformers import there, and every command module answers `--help`;
- the venv holds exactly the lock's packages at the lock's versions (requirements/*.lock, made by `make lock`),
  and `pip check` finds nothing broken.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.test_layout import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "requirements"
SITE_LOCKS = ("uv.lock", "bootstrap.lock", "cpu.lock")  # installed into site-packages
NODEPS_LOCK = "nodeps.lock"  # installed --no-deps into <venv>/nodeps
PROJECT = "t2i-ds"

# `python -m X` for each command: t2i_ds's (a package's __main__ runs as the package) and the compile gate
COMMAND_MODULES = sorted({c.removesuffix(".__main__") for c in COMMANDS} | {"t2i_kernels.compile_check"})


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    # -c puts the working directory first on sys.path, exactly as `python -m` does
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


IMPORTS = f"""
import importlib.util, sys
from pathlib import Path
spec = importlib.util.find_spec("kernels")
places = [spec.origin] if spec and spec.origin else []
places += list(spec.submodule_search_locations or []) if spec else []
ours = [p for p in places if Path(p).resolve().is_relative_to({str(ROOT / "kernels")!r})]
assert not ours, f"'import kernels' finds the repository's folder: {{ours}}"
from diffusers import VQModel
import transformers
transformers.PreTrainedModel
import t2i_kernels, t2i_csrc
print(spec.origin if spec else None)
"""


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_kernels_is_the_pypi_package_and_transformers_imports(where, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    proc = run_python(IMPORTS, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    origin = proc.stdout.strip().splitlines()[-1]
    assert origin == "None" or "site-packages" in origin, origin


HELP_ALL = """
import contextlib, io, json, runpy, sys
failed = {}
for module in json.loads(sys.argv[1]):
    sys.argv = [module, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)  # what `python -m module` runs
        failed[module] = "returned without exiting"
    except SystemExit as e:
        if e.code not in (0, None) or "usage:" not in out.getvalue():
            failed[module] = f"exit {e.code}: {out.getvalue()[-300:]}"
    except BaseException as e:
        failed[module] = f"{type(e).__name__}: {e}"
print(json.dumps(failed))
"""


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_every_command_answers_help(where, tmp_path):
    """`python -m M --help` for every command module M, in one process per directory (imports are shared; runpy
    runs each module as __main__, as -m does)."""
    assert {"t2i_ds.prepare", "t2i_ds.train", "t2i_ds.eval", "t2i_ds.demo", "t2i_ds.paper.align"} <= set(COMMAND_MODULES)
    cwd = ROOT if where == "repository root" else tmp_path
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, json.dumps(COMMAND_MODULES)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"python -m {m} --help: {why}" for m, why in failed.items())


def test_prepare_help_from_the_repository_root():
    """The issue's own reproduction, as a user types it (prepare imports diffusers for MoVQGAN)."""
    proc = subprocess.run([sys.executable, "-m", "t2i_ds.prepare", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-3000:]


# ---- the lock ----

def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """{normalized name: version} from a pip-style lock (`name==version \\` lines, hashes and comments after)."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if m:
            pins[normalize(m.group(1))] = m.group(2)
    return pins


def installed(path: str) -> dict[str, str]:
    return {normalize(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=[path])}


def lock_mismatches(locked: dict[str, tuple[str, str]], present: dict[str, str]) -> list[str]:
    """One line per package that differs: locked maps name -> (version, lock file), present name -> version."""
    lines = []
    for name, (version, lock) in sorted(locked.items()):
        if name not in present:
            lines.append(f"{name}: {lock} pins {version}, the venv does not have it")
        elif present[name] != version:
            lines.append(f"{name}: the venv has {present[name]}, {lock} pins {version}")
    lines += [f"{name}: the venv has {present[name]}, no lock names it" for name in sorted(set(present) - set(locked))]
    return lines


def test_lock_mismatches_names_each_package():
    locked = {"numpy": ("2.4.6", "cpu.lock"), "torch": ("2.13.0+cpu", "bootstrap.lock")}
    assert lock_mismatches(locked, {"numpy": "2.4.6", "torch": "2.13.0+cpu"}) == []
    assert lock_mismatches(locked, {"numpy": "2.4.7", "torch": "2.13.0+cpu"}) == [
        "numpy: the venv has 2.4.7, cpu.lock pins 2.4.6"]
    assert lock_mismatches(locked, {"numpy": "2.4.6"}) == ["torch: bootstrap.lock pins 2.13.0+cpu, the venv does not have it"]
    assert lock_mismatches(locked, {"numpy": "2.4.6", "torch": "2.13.0+cpu", "rich": "1"}) == [
        "rich: the venv has 1, no lock names it"]


def stamp_of_make_venv() -> Path:
    stamp = Path(sys.prefix) / ".installed"
    if not stamp.is_file():
        pytest.skip(f"{sys.prefix} was not built by `make venv` (no .installed stamp): nothing to hold to the lock")
    return stamp


def test_locks_agree_with_each_other():
    """bootstrap.lock is installed first: its pins must be cpu.lock's; gpu.lock is cpu.lock less torch and triton."""
    cpu, boot, gpu = (read_lock(LOCKS / f) for f in ("cpu.lock", "bootstrap.lock", "gpu.lock"))
    assert {"torch", "pip", "setuptools", "wheel"} <= set(boot) and cpu["torch"].endswith("+cpu")
    assert {n: v for n, v in boot.items() if n in cpu and cpu[n] != v} == {}
    assert gpu == {n: v for n, v in cpu.items() if n not in ("torch", "triton")}


def test_venv_matches_the_locks():
    """Every package of the venv at the lock's version, and nothing the locks do not name (`make venv` rebuilds the
    venv from nothing when a lock changes; a package bumped by hand fails here with one line naming it)."""
    stamp_of_make_venv()
    locked = {}
    for lock in (*SITE_LOCKS, NODEPS_LOCK):
        locked.update({n: (v, f"requirements/{lock}") for n, v in read_lock(LOCKS / lock).items()})
    present = installed(sysconfig.get_paths()["purelib"])
    present.pop(PROJECT, None)  # the project itself, installed editable by make venv
    present.update(installed(str(Path(sys.prefix) / "nodeps")))
    problems = lock_mismatches(locked, present)
    assert not problems, "the venv is not the lock's (run `make venv`, or `make lock` after changing pyproject):\n" \
        + "\n".join(problems)


def test_pip_check_finds_nothing_broken():
    stamp_of_make_venv()
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
