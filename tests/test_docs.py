"""Every shell command in README.md and docs/*.md is checked, so the documentation cannot go stale.

Extraction: each ```bash block (and each inline `python -m ...`, `deepspeed ...` or `torchrun ...` span) is run
by bash with PATH emptied and a `command_not_found_handle` that records the argv instead of running it, so bash
itself does the quoting, line continuations, comments and `$VAR` expansion of the documented text.

Checks, by program:
- `deepspeed`: DeepSpeed's own launcher parser (`deepspeed.launcher.runner.parse_args`), then the module's
  `parse_args` (a t2i_ds command must be given as `--module t2i_ds.X`); `t2i_ds.train` also resolves its config
  with `--dry-run` (preset, overrides, ds_config file);
- `torchrun`: torch's own parser (`torch.distributed.run.get_args_parser`), then the same as above;
- `python -m t2i_ds.X`: the command's `parse_args`; the same `--dry-run` for train; other modules must import;
- `make X [VAR=value]`: `make -n` of it succeeds; `tensorboard`: the package is installed;
- `pip install ...`: pip's own option parser, and every `-r` file and `-e` project exists in the repository.
- `apt-get install X`: X is the Debian package a command reads (the replication's corpus, t2i_ds.paper.corpus).
- `sbatch scripts/slurm/X ARGS`: the script exists and ARGS are a valid train command (the template passes them on).
The cluster templates themselves (scripts/) are checked below: bash can read them, DeepSpeed reads the hostfile
example, and tests/test_multinode.py runs the SLURM template's per-node body on two loopback "nodes".
A block preceded by `<!-- doc-test: run ARGS -->` is also run for real on CPU, with ARGS appended (`{tmp}` is a
fresh directory). Any other program fails the test: a new kind of command needs a check here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?:<!-- doc-test: run (?P<run>.*?) -->\n)?```(?:bash|sh)\n(?P<body>.*?)```", re.S)
INLINE = re.compile(r"`((?:python -m|deepspeed|torchrun) [^`]+)`")
RECORDER = r"""
command_not_found_handle() { printf '%s\x1f' "$@" >> "$DOCTEST_OUT"; printf '\x1e' >> "$DOCTEST_OUT"; return 0; }
PATH=/nonexistent-doctest-path
"""


@dataclass
class Command:
    where: str  # file:line of the block
    argv: list[str]
    run_args: str | None  # the block's `doc-test: run` arguments, None when the block is only parsed


def record(scripts: list[str], tmp: Path) -> list[list[list[str]]]:
    """The argv of every external command each script would run, expanded by bash itself.

    The scripts run in order in one shell, as a reader would paste them: a variable set in one block is seen by
    the next. A block bash cannot read fails here, naming it.
    """
    out = tmp / "argv"
    out.write_text("")
    joined = "".join(f"{script}\n__doctest_block_end\n" for script in scripts)
    proc = subprocess.run(["/bin/bash", "-c", RECORDER + joined], env={"DOCTEST_OUT": str(out), "HOME": str(tmp)},
                          capture_output=True, text=True, cwd=tmp)
    assert proc.returncode == 0 and not proc.stderr, f"bash could not read:\n{joined}\n{proc.stderr}"
    per_block: list[list[list[str]]] = [[]]
    for rec in out.read_text().split("\x1e"):
        argv = rec.split("\x1f")[:-1]
        if argv == ["__doctest_block_end"]:
            per_block.append([])
        elif argv:
            per_block[-1].append(argv)
    return per_block[:-1]


def extract(path: Path, tmp: Path) -> list[Command]:
    text = path.read_text()
    blocks = [(f"{path.name}:{text[: m.start('body')].count(chr(10)) + 1}", m.group("body"), m.group("run"))
              for m in FENCE.finditer(text)]
    blocks += [(f"{path.name} (inline)", m.group(1), None) for m in INLINE.finditer(FENCE.sub("", text))]
    found = []
    for (where, _, run), argvs in zip(blocks, record([body for _, body, _ in blocks], tmp)):
        found += [Command(where, argv, run) for argv in argvs]
    return found


def _last_line(stream: io.StringIO) -> str:
    lines = stream.getvalue().strip().splitlines()
    return lines[-1] if lines else ""


def _module_main(module: str):
    return importlib.import_module(module + ".__main__" if module in ("t2i_ds.eval", "t2i_ds.demo") else module)


def check_module_args(module: str, args: list[str]) -> None:
    """A t2i_ds command's own parser accepts `args`; the train command also resolves its config."""
    assert module.startswith("t2i_ds."), f"not a t2i_ds command: {module}"
    mod = _module_main(module)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            mod.parse_args(args)
    except SystemExit as e:
        raise AssertionError(f"{module} rejects {shlex.join(args)}: {_last_line(err)}") from e
    if module == "t2i_ds.train":
        cwd = os.getcwd()
        os.chdir(ROOT)  # documented paths (ds_configs/...) are relative to the repository
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                rc = mod.main([*args, "--dry-run"])
        finally:
            os.chdir(cwd)
        assert rc == 0, f"t2i_ds.train --dry-run {shlex.join(args)}: {err.getvalue().strip()}"


# pip's own option parser, in a child process: importing pip switches off setuptools' distutils shim for the rest of
# the process (_distutils_hack's spec_for_pip), and a later `import setuptools` (torch's cpp_extension, the C++ ops)
# then fails on the stdlib distutils.
PIP_PARSE = """
import json, sys
from pip._internal.commands import create_command
options, _ = create_command("install").parse_args(sys.argv[1:])
print(json.dumps({"requirements": options.requirements, "editables": options.editables}))
"""


def pip_install_options(args: list[str]) -> dict:
    """`pip install ARGS` as pip parses it: {"requirements": [...], "editables": [...]}; a rejected flag fails."""
    proc = subprocess.run([sys.executable, "-c", PIP_PARSE, *args], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 0, f"pip install rejects it: {err[-1] if err else proc.returncode}"
    return json.loads(proc.stdout)


def check(cmd: Command) -> None:
    prog, *rest = cmd.argv
    if prog == "deepspeed":
        from deepspeed.launcher.runner import parse_args as ds_parse

        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                a = ds_parse(rest)
        except SystemExit as e:
            raise AssertionError(f"DeepSpeed's launcher rejects it: {_last_line(err)}") from e
        assert a.module, f"{a.user_script} without --module: the launcher would run it as a file path"
        check_module_args(a.user_script, a.user_args)
    elif prog == "torchrun":
        from torch.distributed.run import get_args_parser

        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                a = get_args_parser().parse_args(rest)
        except SystemExit as e:
            raise AssertionError(f"torchrun rejects it: {_last_line(err)}") from e
        assert a.module, f"{a.training_script} without -m"
        check_module_args(a.training_script, a.training_script_args)
    elif prog in ("python", "python3") and rest[:1] == ["-m"] and len(rest) > 1:
        module, args = rest[1], rest[2:]
        if module.startswith("t2i_ds"):
            check_module_args(module, args)
        else:
            assert importlib.util.find_spec(module) is not None, f"module {module} is not installed"
    elif prog == "make":
        targets = [a for a in rest if "=" not in a]  # the rest are variable assignments (LOCK_FLAGS=--upgrade)
        assert len(targets) == 1, "one make target per command"
        proc = subprocess.run(["make", "-n", *rest], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"make -n {shlex.join(rest)}: {proc.stderr.strip()}"
    elif prog in ("pip", "pip3") and rest[:1] == ["install"]:
        options = pip_install_options(rest[1:])
        missing = [f for f in options["requirements"] if not (ROOT / f).is_file()]
        missing += [e for e in options["editables"] if not (ROOT / e / "pyproject.toml").is_file()]
        assert not missing, f"pip install names files the repository does not have: {missing}"
    elif prog == "apt-get":  # the Debian packages the project's commands read (the replication's corpus)
        from t2i_ds.paper.corpus import DEBIAN_PACKAGE

        assert rest[:1] == ["install"] and rest[1:] == [DEBIAN_PACKAGE], f"apt-get {shlex.join(rest)}: not {DEBIAN_PACKAGE}"
    elif prog == "tensorboard":
        assert importlib.util.find_spec("tensorboard") is not None
    elif prog == "sbatch":  # our batch scripts pass their arguments to the train command
        script, *args = rest
        assert (ROOT / script).is_file() and script.startswith("scripts/slurm/"), f"no batch script {script}"
        check_module_args("t2i_ds.train", args)
    else:
        raise AssertionError(f"no check knows the program {prog!r}: add one to tests/test_docs.py")


def run_for_real(cmd: Command, tmp: Path) -> None:
    extra = shlex.split(cmd.run_args.replace("{tmp}", str(tmp)))
    argv = [sys.executable if cmd.argv[0] in ("python", "python3") else cmd.argv[0], *cmd.argv[1:], *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _all_commands() -> list[Command]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return [c for path in DOCS for c in extract(path, Path(tmp))]


COMMANDS = _all_commands()


def test_the_docs_have_commands():
    progs = {c.argv[0] for c in COMMANDS}
    assert {"deepspeed", "torchrun", "python", "make"} <= progs, progs
    assert any(c.run_args is not None for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where}:{' '.join(c.argv[:4])}" for c in COMMANDS])
def test_documented_command(cmd, tmp_path):
    check(cmd)
    if cmd.run_args is not None:
        run_for_real(cmd, tmp_path)


@pytest.mark.parametrize("script", sorted((ROOT / "scripts" / "slurm").iterdir()), ids=lambda p: p.name)
def test_cluster_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--module t2i_ds.train" in script.read_text() or "scripts/slurm/node.sh" in script.read_text()


def test_hostfile_example_is_read_by_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    hosts = fetch_hostfile(str(ROOT / "scripts" / "hostfile.example"))
    assert len(hosts) == 8 and set(hosts.values()) == {8}


@pytest.mark.parametrize("text, problem", [
    ("deepspeed --num_gpus 8 -m t2i_ds.train --ds_config ds_configs/zero2.json", "rejects"),
    ("deepspeed --num_gpus 8 t2i_ds.train --ds_config ds_configs/zero2.json", "without --module"),
    ("deepspeed --num_gpus 8 --module t2i_ds.train --ds_config ds_configs/zero2.json --set nosuch.field=1", "dry-run"),
    ("deepspeed --num_gpus 8 --module t2i_ds.train --ds_config ds_configs/zero2.json", "data.path is not set"),
    ("torchrun --nproc_per_node 8 -m t2i_ds.train --ds_configg x", "rejects"),
    ("python -m t2i_ds.export --run-dir r", "rejects"),
    ("python -m t2i_ds.nosuch --x", "No module"),
    ("make nosuch", "make -n"),
    ("make lock LOCK_FLAGS=--upgrade test", "one make target"),
    ("pip install --require-hashes -r requirements/nosuch.lock", "does not have"),
    ("pip install --no-such-flag -r requirements/gpu.lock", "rejects"),
    ("wget https://example.com/weights.pt", "no check knows"),
    ("sbatch scripts/slurm/nosuch.sbatch --ds_config ds_configs/zero2.json", "no batch script"),
    ("sbatch scripts/slurm/train.sbatch --ds_config ds_configs/zero2.json --set nosuch.field=1", "dry-run"),
])
def test_a_broken_command_fails(text, problem, tmp_path):
    """The checker itself: each of these broken documentation lines must be caught, naming the problem."""
    (tmp_path / "doc.md").write_text(f"Run:\n\n```bash\n{text}\n```\n")
    (cmd,) = extract(tmp_path / "doc.md", tmp_path)
    with pytest.raises((AssertionError, ModuleNotFoundError), match=problem):
        check(cmd)


FAULTS = ROOT / "docs" / "reliability.md"


def test_the_faults_table_names_existing_tests():
    """docs/reliability.md: every row of its tables names at least one test, and every test it names exists."""
    import ast

    rows = [line for line in FAULTS.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Fault |")]
    assert len(rows) >= 30
    defined: dict[str, set[str]] = {}
    missing = []
    for row in rows:
        named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", row)
        assert named, f"this row of {FAULTS.name} names no test: {row}"
        for file, name in named:
            if file not in defined:
                tree = ast.parse((ROOT / file).read_text()) if (ROOT / file).is_file() else ast.Module(body=[])
                defined[file] = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            if name not in defined[file]:
                missing.append(f"{file}::{name}")
    assert not missing, f"{FAULTS.name} names tests that do not exist: {missing}"
